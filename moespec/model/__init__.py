"""The compiler: builders that turn a resolved `SpecPlan` into torch modules.

Everything under `moespec.model` imports torch; nothing under `moespec.spec` does.
"""
