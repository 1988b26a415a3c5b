"""moespec: declare a Mixture-of-Experts transformer in YAML, then validate, compile,
simulate, profile and explore it.

This top-level package imports nothing heavy: `import moespec.spec` must never load torch,
so tools that only read specs (validation, the simulator, the explorer) start fast.
Importing it caps how long torch's idle OpenMP threads spin (`openmp_tuning`): it must run
before torch loads, and the package's first import is the one place that does.
"""

from moespec.openmp_tuning import limit_openmp_spin

__version__ = "0.1.0"

limit_openmp_spin()  # before torch loads: libgomp reads it once (moespec/openmp_tuning.py)


def __getattr__(name: str):
    """The Python API (moespec/api.py), imported on first use so that `import moespec` stays light."""
    import importlib

    api = importlib.import_module("moespec.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'moespec' has no attribute {name!r}")
