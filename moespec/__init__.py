"""moespec: declare a Mixture-of-Experts transformer in YAML, then validate, compile,
simulate, profile and explore it.

This top-level package imports nothing heavy: `import moespec.spec` must never load torch,
so tools that only read specs (validation, the simulator, the explorer) start fast.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """The Python API (moespec/api.py), imported on first use so that `import moespec` stays light."""
    import importlib

    api = importlib.import_module("moespec.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'moespec' has no attribute {name!r}")
