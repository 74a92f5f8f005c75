"""Builds the optional native extension with CMake; the package works without it (torch backend).

Environment variables:
  HGK_NATIVE=0           skip the native build entirely.
  HGK_CUDA=auto|0|1      CUDA module: auto builds it when nvcc is found (default); 1 requires it.
  HGK_CUDA_ARCHS         CUDA architectures (default "80;90"; CUDA 13 has no target below 75).
  HGK_MARCH_NATIVE=0     compile the CPU kernels for generic x86-64/aarch64 instead of this machine.
  HGK_TORCH_AUTOGRAD=auto|0|1
                         hgkernels._native_autograd (the CPU plans as a C++ autograd node, on the torch
                         C++ ABI): auto builds it when the environment's torch is found (default); 1
                         requires it. Without it the same kernels run behind a Python autograd.Function.
  HGK_REQUIRE_NATIVE=1   fail the install when a native module (CPU, or CUDA with nvcc present)
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
CPU_MODULE, CUDA_MODULE = "hgkernels._native_cpu", "hgkernels._native_cuda"
AUTOGRAD_MODULE = "hgkernels._native_autograd"
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
    """Runs CMake once for all modules; an optional module that fails to build is left out with a warning."""

    def build_extensions(self):
        require = _flag("HGK_REQUIRE_NATIVE", "0") in _ON
        cuda_mode = _flag("HGK_CUDA", "auto")
        nvcc = _nvcc()
        if cuda_mode in _ON and not nvcc:
            raise RuntimeError("HGK_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        want_cuda = bool(nvcc) and cuda_mode not in _OFF
        if not want_cuda:
            print("hgkernels: skipping the CUDA module (" + ("HGK_CUDA=0" if nvcc else "nvcc not found") + ")",
                  file=sys.stderr, flush=True)
        autograd_mode = _flag("HGK_TORCH_AUTOGRAD", "auto")
        self.torch_info = None
        if autograd_mode not in _OFF:
            self.torch_info, why = _torch_build_info()
            if self.torch_info is None:
                if autograd_mode in _ON:
                    raise RuntimeError(f"HGK_TORCH_AUTOGRAD=1 but {why}")
                _warn(f"skipping {AUTOGRAD_MODULE}: {why}; install torch first for the faster autograd path")
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(CPU_MODULE)))
        # (cuda, torch) tries, each dropping an optional module that failed to build, unless it is required
        tries = [(want_cuda, self.torch_info)]
        if want_cuda and not (require or cuda_mode in _ON):
            tries.append((False, self.torch_info))
        if self.torch_info and not (require or autograd_mode in _ON):
            tries.append((False, None))
        built, err = set(), None
        for cuda, torch_info in tries:
            if err is not None:
                _warn(f"an optional native module failed to build ({err}); retrying with "
                      f"{'the CUDA module' if cuda else 'the CPU module'}"
                      f"{' and ' + AUTOGRAD_MODULE if torch_info else ' alone'}")
            try:
                built = self._cmake(out_dir, cuda=cuda, nvcc=nvcc if cuda else "", torch_info=torch_info)
                break
            except (OSError, subprocess.CalledProcessError) as failure:
                err = failure
        if not built:
            if require or (want_cuda and cuda_mode in _ON) or autograd_mode in _ON:
                raise err
            _warn(f"the native extension was not built ({err}); backend='native' is unavailable and "
                  "hgkernels uses its torch backend. Install a C++ compiler and CMake to build it.")
        self.extensions = [ext for ext in self.extensions if ext.name in built]

    def _cmake(self, out_dir: str, cuda: bool, nvcc: str, torch_info) -> set:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake was not found")
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake" + ("_cuda" if cuda else "")))
        staging = os.path.join(build_dir, "modules")
        os.makedirs(staging, exist_ok=True)
        args = [cmake, "-S", HERE, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython_EXECUTABLE={sys.executable}", *_pybind11_args(torch_info),
                f"-DHGK_OUTPUT_DIR={staging}", f"-DHGK_CUDA={'ON' if cuda else 'OFF'}",
                f"-DHGK_MARCH_NATIVE={'OFF' if _flag('HGK_MARCH_NATIVE', '1') in _OFF else 'ON'}"]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            args.append("-GNinja")
        if torch_info:
            args += ["-DHGK_TORCH_AUTOGRAD=ON", f"-DHGK_TORCH_INCLUDE_DIRS={';'.join(torch_info['include'])}",
                     f"-DHGK_TORCH_LIBRARY_DIR={torch_info['lib']}",
                     f"-DHGK_TORCH_CXX11_ABI={torch_info['cxx11_abi']}", f"-DHGK_TORCH_VERSION={torch_info['version']}"]
        else:
            args.append("-DHGK_TORCH_AUTOGRAD=OFF")
        if cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DHGK_CUDA_ARCHS={os.environ.get('HGK_CUDA_ARCHS', '80;90')}"]
        subprocess.check_call(args)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", build_dir, "--parallel", jobs])
        modules = {CPU_MODULE} | ({CUDA_MODULE} if cuda else set()) | ({AUTOGRAD_MODULE} if torch_info else set())
        for name in modules:
            _install_atomically(os.path.join(staging, os.path.basename(self.get_ext_filename(name))), out_dir)
        return modules


def _pybind11_args(torch_info) -> list:
    """pybind11's CMake package when it is installed; else the pybind11 headers that torch bundles, so an
    in-place build works on a machine with torch but no network to fetch pybind11 (a lent GPU machine)."""
    try:
        import pybind11
    except ImportError:
        bundled = [path for path in (torch_info or {}).get("include", [])
                   if os.path.exists(os.path.join(path, "pybind11", "pybind11.h"))]
        if not bundled:
            raise OSError("pybind11 is not installed and no torch with bundled pybind11 headers was found")
        print(f"hgkernels: pybind11 is not installed; using torch's bundled headers in {bundled[0]}",
              file=sys.stderr, flush=True)
        return [f"-DHGK_PYBIND11_INCLUDE_DIR={bundled[0]}"]
    return [f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]


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
    ext_modules = [Extension(name, sources=[]) for name in (CPU_MODULE, CUDA_MODULE, AUTOGRAD_MODULE)]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
