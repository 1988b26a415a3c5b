"""moespec: declare a Mixture-of-Experts transformer in YAML, then validate, compile,
simulate, profile and explore it.

This top-level package imports nothing heavy: `import moespec.spec` must never load torch,
so tools that only read specs (validation, the simulator, the explorer) start fast.
"""

__version__ = "0.1.0"
