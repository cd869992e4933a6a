"""Builds fusedrect._C against the torch already installed (hence `pip install --no-build-isolation .`).

One extension: a CppExtension with the CPU kernels, or a CUDAExtension that also compiles csrc/cuda (the
kernels in .cu files, their host code in .cpp files, which the C++ compiler builds faster) when torch has CUDA
and a CUDA toolkit is found. Environment:
    FUSEDRECT_FORCE_CPU=1         build the CPU-only extension even where CUDA is available
    FUSEDRECT_CPU_CAPABILITY=X    at::vec instruction set of the CPU kernels: DEFAULT, AVX2 or AVX512
                                  (default: what this machine's torch reports, like -march=native)
    TORCH_CUDA_ARCH_LIST          CUDA architectures (default "8.0;9.0")
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cpu_capability():
    requested = os.environ.get("FUSEDRECT_CPU_CAPABILITY")
    if requested is not None:
        if requested not in CPU_CAPABILITY_FLAGS:
            raise ValueError(
                f"FUSEDRECT_CPU_CAPABILITY must be one of {sorted(CPU_CAPABILITY_FLAGS)}, got {requested!r}"
            )
        return requested
    found = torch.backends.cpu.get_cpu_capability()
    return found if found in CPU_CAPABILITY_FLAGS else "DEFAULT"


def with_cuda():
    if os.environ.get("FUSEDRECT_FORCE_CPU", "0") == "1":
        return False
    home = cpp_extension.CUDA_HOME  # $CUDA_HOME, else guessed from nvcc's location
    toolkit = home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))
    return torch.version.cuda is not None and toolkit


def extension():
    capability = cpu_capability()
    macros = [("CPU_CAPABILITY", capability)]
    if capability != "DEFAULT":
        macros.append((f"CPU_CAPABILITY_{capability}", None))
    cxx = ["-O3", *CPU_CAPABILITY_FLAGS[capability]]
    # at::parallel_for is a header template: without OpenMP here it runs every loop on one thread.
    # Linking -fopenmp resolves to the libgomp that torch itself loaded (same soname).
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    cxx += openmp
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if not with_cuda():
        return cpp_extension.CppExtension(
            "fusedrect._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx}, extra_link_args=openmp
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return cpp_extension.CUDAExtension(
        "fusedrect._C",
        sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=macros + [("FUSEDRECT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=openmp,
    )


setup(
    packages=["fusedrect", "fusedrect.ops", "fusedrect.kernels"],
    package_dir={"fusedrect.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
