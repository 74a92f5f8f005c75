"""Builds the optional native extension, hgkernels._native, with CMake against the installed torch; the
package works without it (torch backend).

Environment variables:
  HGK_NATIVE=0           skip the native build entirely.
  HGK_CUDA=auto|0|1      compile the CUDA kernels in: auto when nvcc is found (default); 1 requires them.
  HGK_CUDA_ARCHS         CUDA architectures (default "80;90"; CUDA 13 has no target below 75).
  HGK_MARCH_NATIVE=0     compile the CPU kernels for generic x86-64/aarch64 instead of this machine.
  HGK_REQUIRE_NATIVE=1   fail the install when the module (with the CUDA kernels, when nvcc is present)
                         fails to build, instead of warning (CI sets it to catch compile errors).
  MAX_JOBS               parallel compile jobs.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "hgkernels._native"
_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _warn(message: str) -> None:
    print(f"hgkernels: WARNING: {message}", file=sys.stderr, flush=True)


def _nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or ""


_TORCH_PROBE = """import json, torch, torch.utils.cpp_extension as ext
print(json.dumps({"include": ext.include_paths(), "lib": ext.library_paths()[0], "version": torch.__version__,
                  "cxx11_abi": int(torch._C._GLIBCXX_USE_CXX11_ABI)}))"""


def _torch_build_info():
    """The include/library paths, version and C++ ABI flag of the torch this package will run with, or
    (None, why). pip builds in an isolated environment without torch (a torch build requirement would
    pull a CUDA wheel onto CPU machines), so the probe runs in a child interpreter with pip's isolation
    variables removed: the environment being installed into, where the README installs torch first."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run([sys.executable, "-c", _TORCH_PROBE], env=env, capture_output=True, text=True,
                             timeout=300, check=True).stdout
        import json
        return json.loads(out.strip().splitlines()[-1]), None
    except subprocess.CalledProcessError as err:
        why = (err.stderr or "").strip().splitlines()[-1:] or [f"exit status {err.returncode}"]
        return None, f"torch was not found for {sys.executable} ({why[0]})"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:
        return None, f"torch was not found for {sys.executable} ({err})"


class CMakeBuild(build_ext):
    """Runs CMake for the module; without torch, a compiler or CMake it is left out with a warning."""

    def build_extensions(self):
        require = _flag("HGK_REQUIRE_NATIVE", "0") in _ON
        cuda_mode = _flag("HGK_CUDA", "auto")
        nvcc = _nvcc()
        if cuda_mode in _ON and not nvcc:
            raise RuntimeError("HGK_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        want_cuda = bool(nvcc) and cuda_mode not in _OFF
        if not want_cuda:
            print("hgkernels: building without the CUDA kernels (" + ("HGK_CUDA=0" if nvcc else "nvcc not found") + ")",
                  file=sys.stderr, flush=True)
        torch_info, err = _torch_build_info()
        built = False
        if torch_info is not None:
            # the CUDA kernels are optional unless required: a failed CUDA build retries without them
            tries = [want_cuda] + ([False] if want_cuda and not (require or cuda_mode in _ON) else [])
            for k, cuda in enumerate(tries):
                if k:
                    _warn(f"the module with the CUDA kernels failed to build ({err}); retrying without them")
                try:
                    self._cmake(os.path.dirname(os.path.abspath(self.get_ext_fullpath(MODULE))), cuda, nvcc,
                                torch_info)
                    built = True
                    break
                except (OSError, subprocess.CalledProcessError) as failure:
                    err = failure
        if not built:
            if require or cuda_mode in _ON:
                raise RuntimeError(f"the native extension was not built: {err}")
            _warn(f"the native extension was not built ({err}); backend='native' is unavailable and "
                  "hgkernels uses its torch backend. Install torch first, a C++ compiler and CMake to build it.")
            self.extensions = []

    def _cmake(self, out_dir: str, cuda: bool, nvcc: str, torch_info) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake was not found")
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake" + ("_cuda" if cuda else "")))
        staging = os.path.join(build_dir, "modules")
        os.makedirs(staging, exist_ok=True)
        args = [cmake, "-S", HERE, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython_EXECUTABLE={sys.executable}", f"-DHGK_OUTPUT_DIR={staging}",
                f"-DHGK_CUDA={'ON' if cuda else 'OFF'}",
                f"-DHGK_MARCH_NATIVE={'OFF' if _flag('HGK_MARCH_NATIVE', '1') in _OFF else 'ON'}",
                f"-DHGK_TORCH_INCLUDE_DIRS={';'.join(torch_info['include'])}",
                f"-DHGK_TORCH_LIBRARY_DIR={torch_info['lib']}", f"-DHGK_TORCH_CXX11_ABI={torch_info['cxx11_abi']}",
                f"-DHGK_TORCH_VERSION={torch_info['version']}"]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            args.append("-GNinja")
        if cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DHGK_CUDA_ARCHS={os.environ.get('HGK_CUDA_ARCHS', '80;90')}"]
        subprocess.check_call(args)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", build_dir, "--parallel", jobs])
        _install_atomically(os.path.join(staging, os.path.basename(self.get_ext_filename(MODULE))), out_dir)


def _install_atomically(path: str, out_dir: str) -> None:
    """Copy a built module into the package by rename: a process that has the old file loaded keeps
    its (now unlinked) copy, where linking or copying in place would rewrite pages it has mapped."""
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, os.path.basename(path))
    temporary = target + ".tmp"
    shutil.copy2(path, temporary)
    os.replace(temporary, target)


if _flag("HGK_NATIVE", "1") in _OFF:
    print("hgkernels: HGK_NATIVE=0, skipping the native extension (torch backend only)", file=sys.stderr)
    ext_modules = []
else:
    ext_modules = [Extension(MODULE, sources=[])]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
