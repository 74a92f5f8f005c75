"""Builds the optional native extension with CMake; the package works without it (torch backend).

Environment variables:
  HGK_NATIVE=0           skip the native build entirely.
  HGK_CUDA=auto|0|1      CUDA module: auto builds it when nvcc is found (default); 1 requires it.
  HGK_CUDA_ARCHS         CUDA architectures (default "80;90"; CUDA 13 has no target below 75).
  HGK_MARCH_NATIVE=0     compile the CPU kernels for generic x86-64/aarch64 instead of this machine.
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


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _warn(message: str) -> None:
    print(f"hgkernels: WARNING: {message}", file=sys.stderr, flush=True)


def _nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or ""


class CMakeBuild(build_ext):
    """Runs CMake once for both modules; a module that fails to build is left out with a warning."""

    def build_extensions(self):
        require = _flag("HGK_REQUIRE_NATIVE", "0") in ("1", "true", "on", "yes")
        cuda_mode = _flag("HGK_CUDA", "auto")
        nvcc = _nvcc()
        if cuda_mode in ("1", "true", "on", "yes") and not nvcc:
            raise RuntimeError("HGK_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        want_cuda = bool(nvcc) and cuda_mode not in ("0", "false", "off", "no")
        if not want_cuda:
            print("hgkernels: skipping the CUDA module (" + ("HGK_CUDA=0" if nvcc else "nvcc not found") + ")",
                  file=sys.stderr, flush=True)
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(CPU_MODULE)))
        built = set()
        try:
            built = self._cmake(out_dir, cuda=want_cuda, nvcc=nvcc)
        except (OSError, subprocess.CalledProcessError) as err:
            if want_cuda and (require or cuda_mode in ("1", "true", "on", "yes")):
                raise
            if want_cuda:
                _warn(f"the CUDA module failed to build ({err}); retrying the CPU module alone")
                try:
                    built = self._cmake(out_dir, cuda=False, nvcc="")
                except (OSError, subprocess.CalledProcessError) as cpu_err:
                    err = cpu_err
            if not built:
                if require:
                    raise
                _warn(f"the native extension was not built ({err}); backend='native' is unavailable and "
                      "hgkernels uses its torch backend. Install a C++ compiler and CMake to build it.")
        self.extensions = [ext for ext in self.extensions if ext.name in built]

    def _cmake(self, out_dir: str, cuda: bool, nvcc: str) -> set:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake was not found")
        import pybind11

        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake" + ("_cuda" if cuda else "")))
        staging = os.path.join(build_dir, "modules")
        os.makedirs(staging, exist_ok=True)
        args = [cmake, "-S", HERE, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                f"-DHGK_OUTPUT_DIR={staging}", f"-DHGK_CUDA={'ON' if cuda else 'OFF'}",
                f"-DHGK_MARCH_NATIVE={'OFF' if _flag('HGK_MARCH_NATIVE', '1') in ('0', 'false', 'off', 'no') else 'ON'}"]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            args.append("-GNinja")
        if cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DHGK_CUDA_ARCHS={os.environ.get('HGK_CUDA_ARCHS', '80;90')}"]
        subprocess.check_call(args)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", build_dir, "--parallel", jobs])
        modules = {CPU_MODULE} | ({CUDA_MODULE} if cuda else set())
        for name in modules:
            _install_atomically(os.path.join(staging, os.path.basename(self.get_ext_filename(name))), out_dir)
        return modules


def _install_atomically(path: str, out_dir: str) -> None:
    """Copy a built module into the package by rename: a process that has the old file loaded keeps
    its (now unlinked) copy, where linking or copying in place would rewrite pages it has mapped."""
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, os.path.basename(path))
    temporary = target + ".tmp"
    shutil.copy2(path, temporary)
    os.replace(temporary, target)


if _flag("HGK_NATIVE", "1") in ("0", "false", "off", "no"):
    print("hgkernels: HGK_NATIVE=0, skipping the native extension (torch backend only)", file=sys.stderr)
    ext_modules = []
else:
    ext_modules = [Extension(CPU_MODULE, sources=[]), Extension(CUDA_MODULE, sources=[])]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
