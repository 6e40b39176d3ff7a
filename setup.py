"""Builds vqkernels._C with torch's cpp_extension.

- The C++ CPU kernels (csrc/cpu/*.cpp) are always built.
- The CUDA kernels (csrc/cuda/*.cu + their launchers csrc/cuda/*.cpp) are built when the installed
  torch has CUDA and nvcc is found (CUDA_HOME), unless VQKERNELS_BUILD_CUDA=0.
- If the extension cannot be built at all, the package still installs and runs on its PyTorch path
  (vqkernels.info() says so), unless VQKERNELS_REQUIRE_EXT=1 (CI sets it: a broken kernel fails CI).

Build without isolation so the extension is built against the torch that is installed:
    pip install --no-build-isolation .
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# nvcc flags of the CUDA kernels (on top of cpp_extension's own). A literal: tests/test_cuda_build.py
# reads it from this file (without running it) to compile each .cu as the build does.
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


def _flag(name, default):
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() not in ("0", "false", "no", "off", "")


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # no torch at build time: pure-Python install
        print(f"vqkernels: torch not importable at build time ({e}); installing without _C", file=sys.stderr)
        return [], {}

    cpu_sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: cpp_extension picks the standard this torch needs (C++20 for torch >= 2.10ish, C++17 before).
    cxx = ["-O3", "-fvisibility=hidden"]
    ldflags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template around `#pragma omp parallel`: without -fopenmp it
        # silently runs on one thread. With it, our kernels share torch's OpenMP pool (libgomp).
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    define_macros = []
    want_cuda = _flag("VQKERNELS_BUILD_CUDA", True)
    has_cuda = want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda and not has_cuda:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)"
        print(f"vqkernels: building CPU kernels only: {why}", file=sys.stderr)
    if has_cuda:
        # With no GPU visible, torch would build for every arch it knows: slow. Default to Hopper.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            visible = False
            try:
                visible = torch.cuda.is_available()
            except Exception:
                pass
            if not visible:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        define_macros += [("VQKERNELS_WITH_CUDA", None), ("VQKERNELS_CUDA_ARCHS", f'"{archs}"')]
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = list(NVCC_FLAGS)
        ext = cpp_extension.CUDAExtension(
            "vqkernels._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=ldflags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "vqkernels._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
        )

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            # A persistent object folder (build/temp-vqkernels), also for `pip install -e .`, which otherwise
            # compiles in a fresh temporary folder every time: ninja then recompiles only the sources that
            # changed (and what includes a changed header), so an unchanged tree relinks in seconds.
            # VQKERNELS_BUILD_TEMP=<dir> puts it elsewhere; =0 keeps setuptools' choice.
            where = os.environ.get("VQKERNELS_BUILD_TEMP", os.path.join(ROOT, "build", "temp-vqkernels"))
            if where.strip().lower() not in ("0", "false", "no", "off", ""):
                self.build_temp = where

        def run(self):
            try:
                super().run()
            except Exception as e:
                if _flag("VQKERNELS_REQUIRE_EXT", False):
                    raise
                print(f"vqkernels: WARNING: could not build _C ({e}); the package will run on its PyTorch path",
                      file=sys.stderr)

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
