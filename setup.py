"""Builds fastnorm._core: the C kernels in src/ plus the one CPython/NumPy glue file."""
import numpy
from setuptools import Extension, setup

KERNELS = ["src/convert.c", "src/vector.c", "src/parallel.c", "src/group_norm.c", "src/batch_norm.c", "src/summary.c",
           "src/add_norm.c"]

core = Extension(
    "fastnorm._core",
    sources=["src/_core.c", *KERNELS],
    include_dirs=["src", numpy.get_include()],
    # -fopenmp-simd only honours `#pragma omp simd` (no OpenMP runtime); no -ffast-math.
    extra_compile_args=["-std=c11", "-O3", "-fopenmp-simd", "-pthread", "-Wall", "-Wextra"],
    extra_link_args=["-pthread"],
    libraries=["m"],
)

setup(ext_modules=[core])
