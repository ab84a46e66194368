"""Build the kvarena._arena extension from pyx/_arena.pyx.

Cython directives are set here once for the whole extension. Bounds checks
are off: kvarena/cache.py validates every input before the kernel sees it.
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


class OpenMPBuildExt(build_ext):
    """Add the compiler's OpenMP flag; build serial kernels if it has none."""

    def build_extensions(self):
        # the checked and release builds share file names: always rebuild
        self.force = True
        msvc = self.compiler.compiler_type == "msvc"
        openmp = ["/openmp"] if msvc else ["-fopenmp"]
        # let the compiler vectorise the dot-product reductions
        fast = [] if msvc else ["-O3", "-fno-math-errno", "-fassociative-math",
                                "-fno-signed-zeros", "-fno-trapping-math"]
        for ext in self.extensions:
            ext.extra_compile_args += fast
        try:
            self._build_with(openmp, link=not msvc)
        except Exception as exc:  # a compiler or linker without OpenMP
            self.warn(f"building without OpenMP ({exc}); the kernel runs on one thread")
            self._build_with([], link=False)

    def _build_with(self, openmp, link):
        for ext in self.extensions:
            ext.extra_compile_args = [a for a in ext.extra_compile_args if "openmp" not in a] + openmp
            ext.extra_link_args = openmp if link else []
        super().build_extensions()


extension = Extension(
    "kvarena._arena",
    ["pyx/_arena.pyx"],
    include_dirs=[np.get_include()],
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
    cmdclass={"build_ext": OpenMPBuildExt},
)
