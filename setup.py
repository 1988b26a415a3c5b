"""The one compiled part of moespec: the BASE auction's round (moespec/model/_auction_c.c).

Optional: where it cannot be built (no C compiler) the install still succeeds and the auction
runs its numpy round (moespec/model/auction_kernels.py says which runs). Everything else is in
pyproject.toml. It is a plain C library loaded with ctypes, not a Python extension module: it
needs no Python headers. -ffp-contract=off keeps its float sums those of the numpy round.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "moespec.model._auction_c",
            sources=["moespec/model/_auction_c.c"],
            depends=["moespec/model/_auction_paths.h"],  # included by _auction_c.c, once per float type
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
