"""Build the kvarena._arena extension from pyx/_arena.pyx.

Cython directives are set here once for the whole extension. Bounds checks
are off: the accessor's entry points check every index and shape themselves
(pyx/_arena.pyx), and kvarena/cache.py every input before that.
KVARENA_CYTHON_DEBUG=1 at build time turns bounds and initialisation
checks back on, so the test suite can run once against a checked build.
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("KVARENA_CYTHON_DEBUG", "0") == "1"

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "initializedcheck": DEBUG,
    "wraparound": False,
    "nonecheck": False,
    "cdivision": True,
}


class KernelBuildExt(build_ext):
    """Compiler flags for the kernel (pyx/kernel.h): GCC or Clang.

    The kernel's instruction sets are chosen at run time (kernel.h compiles
    its body for AVX-512, AVX2 and the baseline), so nothing here depends on
    the build machine: no -march.
    """

    def build_extensions(self):
        # the checked and release builds share file names: always rebuild
        self.force = True
        if self.compiler.compiler_type == "msvc":
            raise RuntimeError("kvarena's kernel needs GCC or Clang (GNU vector extensions, "
                               "POSIX threads); MSVC cannot build it")
        # -fopenmp-simd: honour the kernel's `omp simd` loops (no OpenMP
        # runtime). No reassociation: the kernel's sums are written as the
        # trees it wants, and a row must be summed in the same order by
        # every path that reads it (in place or converted), so that a
        # query's result does not depend on which path ran. Contraction into
        # FMAs stays on (GCC's default): the vector sums fuse alike
        # everywhere, and the scalar tails say so themselves (KV_MULADD)
        compile_args = ["-O3", "-fopenmp-simd", "-pthread", "-fno-math-errno",
                        "-fno-signed-zeros", "-fno-trapping-math"]
        link_args = ["-pthread"]
        for ext in self.extensions:
            ext.extra_compile_args += compile_args
            ext.extra_link_args += link_args
        super().build_extensions()


extension = Extension(
    "kvarena._arena",
    ["pyx/_arena.pyx"],
    include_dirs=[np.get_include(), "pyx"],
    depends=["pyx/kernel.h", "pyx/kernel_variants.h", "pyx/kernel_impl.h", "pyx/pool.h"],
    define_macros=[
        ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
        ("KVARENA_BOUNDSCHECK", "1" if DEBUG else "0"),
    ],
)

setup(
    # here rather than in pyproject.toml's [tool.setuptools], which the
    # setuptools a new venv gets (65) reports as beta on every build
    packages=find_packages(include=["kvarena", "kvarena.*"]),
    # do not install the Cython sources or generated C next to the package
    include_package_data=False,
    ext_modules=cythonize(
        [extension],
        compiler_directives=DIRECTIVES,
        build_dir="build/cython-debug" if DEBUG else "build/cython",
    ),
    cmdclass={"build_ext": KernelBuildExt},
)
