"""The spec layer: YAML text -> schema check -> semantic checks -> frozen `SpecPlan`.

Pure Python on purpose (no torch import, a test proves it): validation, the simulator and
the explorer need no tensor library and start fast.
"""

from __future__ import annotations

from pathlib import Path

from moespec.spec.errors import SpecError, SpecErrors, format_path
from moespec.spec.plan import SpecPlan
from moespec.spec.resolve import resolve
from moespec.spec.schema import load_schema, parse_checked
from moespec.spec.yaml_source import read_spec_text

__all__ = ["SpecError", "SpecErrors", "SpecPlan", "format_path", "load_plan", "plan_from_text", "load_schema"]


def plan_from_text(text: str, file: str = "<spec>") -> SpecPlan:
    """Resolve spec text into a plan, or raise SpecErrors carrying every error found."""
    data, locations = parse_checked(text, file, "spec", not_a_mapping="a spec is a mapping (version:, name:, model:, ...); this document is not")
    try:
        return resolve(data, locations)
    except SpecErrors:
        raise
    except (ArithmeticError, ValueError, TypeError, KeyError, RecursionError) as exc:
        # A schema-valid spec should never get here; if it does, it is still one located line.
        raise SpecErrors([locations.error((), f"cannot resolve this spec ({type(exc).__name__}: {exc}); please report it")]) from None


def load_plan(path: str | Path) -> SpecPlan:
    """Read, validate and resolve a spec file; raises SpecErrors (never another exception for bad input)."""
    return plan_from_text(read_spec_text(Path(path)), str(path))
