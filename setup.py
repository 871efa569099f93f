"""Builds the decode matmul kernels (csrc/) as ``gptstack._kernels`` when torch is importable at
build time (``pip install --no-build-isolation -e .`` after torch, as the Makefile does). Without
torch (an isolated build) the package installs pure Python, and inference falls back to PyTorch
ops (``gptstack.inference.kernels.available()`` is then False). Everything else is in pyproject.toml.
"""

import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    print("WARNING: torch is not importable at build time: gptstack._kernels is not built and the decode "
          "matmuls fall back to PyTorch. Install torch first, then `pip install --no-build-isolation .`")
    setup()
else:
    # No -march: each kernel copy carries its own target and is picked at run time (csrc/decode_kernels.cpp).
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers (serial without it); the library
    # links libgomp.so.1 by soname, so it shares the copy torch has already loaded, not a second runtime.
    # -Wno-maybe-uninitialized: GCC 12 flags its own _mm512_undefined_* inside the AVX-512 intrinsics.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    kernels = CppExtension("gptstack._kernels", ["csrc/decode_kernels.cpp", "csrc/decode_stack.cpp", "csrc/race_sample.cpp"],
                           depends=["csrc/kernels.h", "csrc/tile_kernels.h", "csrc/int8_dot_kernels.h", "csrc/attention_kernels.h"],
                           extra_compile_args=["-O3", "-Wno-maybe-uninitialized", *openmp],
                           extra_link_args=openmp)
    setup(ext_modules=[kernels], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)})
