"""Sweep axes: a spec path (`moe.experts.count`) and the values it takes.

An axis is either *fast* or *structural*. A fast axis maps one-to-one onto a `DesignBatch`
field (experts, k, capacity factor, parallel degrees, ...): its values go straight into numpy
columns and the spec rules they touch are re-checked vectorised in space.py. Every other path
(router type, placement, model width, ...) is structural: each combination of structural
values is written into the base spec and resolved once by the spec layer, so those rules are
the spec layer's own. Structural spaces are small (a few router types times a few
placements); fast spaces are where the millions of designs come from.

Values are checked here against the spec schema's own definition of the path, so a typo in a
sweep is one located line at load time, not a million invalid designs later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jsonschema
import numpy as np

from moespec.spec.errors import PathT, SpecError
from moespec.spec.schema import load_schema, suggest
from moespec.spec.yaml_source import Locations

# Spec path -> DesignBatch field: the fast path (no SpecPlan per design).
FAST_FIELDS: dict[tuple[str, ...], str] = {
    ("moe", "experts", "count"): "experts",
    ("moe", "experts", "d_ff"): "expert_d_ff",
    ("moe", "experts", "shared_count"): "shared_count",
    ("moe", "experts", "shared_d_ff"): "shared_d_ff",
    ("moe", "router", "k"): "k",
    ("moe", "capacity", "factor"): "capacity_factor",
    ("moe", "capacity", "min_capacity"): "min_capacity",
    ("model", "vocab_size"): "vocab",
    ("model", "seq_len"): "seq_len",
    ("parallelism", "dp"): "dp",
    ("parallelism", "ep"): "ep",
    ("parallelism", "tp"): "tp",
    ("parallelism", "pp"): "pp",
    ("parallelism", "micro_batch"): "micro_batch",
    ("parallelism", "global_batch"): "global_batch",
    ("parallelism", "precision"): "precision",
    ("parallelism", "zero_stage"): "zero_stage",
    ("parallelism", "recompute"): "recompute",
    ("parallelism", "pp_schedule"): "pp_schedule",
    ("parallelism", "sequence_parallel"): "sequence_parallel",
}
MAX_AXIS_VALUES = 1_000_000  # a range longer than this is a typo, not a question
MAX_VALUE_ERRORS = 3  # per axis: the first few bad values say what is wrong
# Each combination of structural values is resolved by the spec layer (~1 ms each), once.
MAX_STRUCTURES = 4096
_NOT_AXES = {("moe", "overrides"): "the explorer needs every MoE layer alike, so moe.overrides cannot be an axis; sweep moe.router, moe.experts or moe.capacity instead"}


@dataclass(frozen=True)
class Axis:
    path: tuple[str, ...]
    values: tuple  # in sweep order; numbers, strings, booleans or mappings
    field: str | None  # DesignBatch field for the fast path; None: structural

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def fast(self) -> bool:
        return self.field is not None


def parse_axis(key: str, raw, locations: Locations) -> tuple[Axis | None, list[SpecError]]:
    """One `axes:` entry -> Axis, or the located errors that stop it."""
    where: PathT = ("axes", key)
    path = tuple(key.split("."))
    leaf, problem = spec_property(path)
    if problem:
        return None, [locations.error(where, problem)]
    values, problem = expand(raw)
    if problem:
        return None, [locations.error(where, problem, key=False)]
    validator = _leaf_validator(leaf)
    # A list is checked value by value; a range (monotone, maybe 10^6 values) by its ends and
    # its step, which decide every value between them.
    checked = list(enumerate(values)) if isinstance(raw, list) else [(0, values[0]), (len(values) - 1, values[-1])]
    if not isinstance(raw, list) and len(values) > 1:
        checked.append((1, values[1]))
    errors = []
    for i, value in checked:
        problem = value_problem(validator, value, key)
        if problem and len(errors) < MAX_VALUE_ERRORS:
            errors.append(locations.error(where + (i,) if isinstance(raw, list) else where, f"value {_show(value)} {problem}", key=False))
    if isinstance(raw, list) and len({_hashable(value) for value in values}) != len(values):
        errors.append(locations.error(where, "lists a value twice; list each value once", key=False))
    return (None if errors else Axis(path, tuple(values), FAST_FIELDS.get(path))), errors


def spec_property(path: tuple[str, ...]) -> tuple[dict, str]:
    """The spec schema's definition of `path`, or ({}, why not) with a did-you-mean."""
    root = load_schema("spec")
    if path in _NOT_AXES:
        return {}, _NOT_AXES[path]
    if path[0] not in ("model", "moe", "parallelism") or len(path) < 2:
        hint = suggest(path[0], ("model", "moe", "parallelism")) if len(path) > 1 else ""
        return {}, f"{'.'.join(path)} is not a design field: axes are spec paths under model., moe. or parallelism.{hint}"
    node: dict = root
    for depth, part in enumerate(path):
        options = _properties(root, node)
        if part not in options:
            where = ".".join(path[:depth])
            if not options:
                return {}, f"{'.'.join(path)} is not a spec path: {where} is a value, not a mapping; use {where}"
            hint = suggest(part, options) or f"; fields there: {', '.join(sorted(options))}"
            return {}, f"{'.'.join(path)} is not a spec path: no field {part!r} in {where}{hint}"
        node = options[part]
    return node, ""


def _properties(root: dict, node: dict) -> dict:
    """Properties of an object definition; for a tagged union (router, placement) the union
    of every variant's, since which variant applies is only known per design."""
    node = _deref(root, node)
    found = dict(node.get("properties", {}))
    for branch in node.get("allOf", []):
        variant = _deref(root, branch.get("then", {}))
        for key, value in variant.get("properties", {}).items():
            found.setdefault(key, value)
    return found


def _deref(root: dict, node: dict) -> dict:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = {**root["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def expand(raw) -> tuple[list, str]:
    """A list as written, or a range's values (both ends included when a step lands on them)."""
    if isinstance(raw, list):
        return list(raw), ""
    start, stop = raw["start"], raw["stop"]
    if stop < start:
        return [], f"range stop ({stop}) is below start ({start}); swap them"
    if "factor" in raw:
        if "step" in raw:
            return [], "a range takes step (linear) or factor (log), not both; remove one"
        if start <= 0:
            return [], f"a log range needs start > 0, got {start}; start at a positive value"
        with np.errstate(all="ignore"):
            intervals = float((np.log(np.float64(stop)) - np.log(np.float64(start))) / np.log(np.float64(raw["factor"])))
        make = (lambda i: start * raw["factor"] ** i)
    else:
        step = raw.get("step", 1)
        with np.errstate(all="ignore"):
            intervals = float((np.float64(stop) - start) / step)  # inf when the span or the step is extreme
        make = (lambda i: start + i * step)
    if not math.isfinite(intervals) or intervals + 1 > MAX_AXIS_VALUES:  # from the arithmetic, before making any value
        shown = "more values than a float counts" if not math.isfinite(intervals) else f"{math.floor(intervals + 1e-9) + 1:,.0f} values"
        return [], f"this range has {shown} (over {MAX_AXIS_VALUES:,}); use a coarser step or factor"
    count = math.floor(intervals + 1e-9) + 1
    integral = all(isinstance(raw.get(key, 1), int) for key in ("start", "step", "factor"))
    values = [int(round(make(i))) if integral else float(f"{make(i):.12g}") for i in range(count)]
    return values, ""


def _leaf_validator(leaf: dict) -> jsonschema.Draft202012Validator:
    """A validator for one spec field's definition ($refs resolve against the spec's $defs)."""
    return jsonschema.Draft202012Validator({**leaf, "$defs": load_schema("spec")["$defs"]})


def value_problem(validator: jsonschema.Draft202012Validator, value, key: str) -> str:
    """Why `value` cannot be written at the field `validator` checks ('' when it can)."""
    errors = sorted(validator.iter_errors(value), key=lambda e: (len(e.absolute_path), str(e.message)))
    if not errors:
        return ""
    error = errors[0]
    inner = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    kind, limit = error.validator, error.validator_value
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        return f"is not allowed for {key}{inner}: it must be {sign} {limit}"
    if kind == "enum":
        hint = suggest(error.instance, limit) if isinstance(error.instance, str) else ""
        return f"is not allowed for {key}{inner}: choose one of {', '.join(map(str, limit))}{hint}"
    if kind == "type":
        expected = " or ".join(limit if isinstance(limit, list) else [limit])
        return f"has the wrong type for {key}{inner}: expected {expected}"
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = next((k for k in error.instance if k not in allowed), "?")
        hint = suggest(extra, allowed) or f"; allowed: {', '.join(allowed)}"
        return f"has unknown key {extra!r} for {key}{inner}{hint}"
    if kind == "required":
        return f"is missing a key for {key}{inner}: {error.message}"
    if kind == "const":
        return f"is not allowed for {key}{inner}: it must be {limit!r}"
    return f"is not valid for {key}{inner}: {error.message}"


def show_value(value) -> str:
    """Compact text for a table cell: mappings as `type(key=value, ...)`."""
    if isinstance(value, dict):
        inner = ",".join(f"{k}={show_value(v)}" for k, v in value.items() if k != "type")
        return f"{value.get('type', '')}({inner})" if "type" in value else "{" + inner + "}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _show(value) -> str:
    text = show_value(value)
    return repr(text) if isinstance(value, str) else text


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return (type(value) is bool, value)  # True and 1 are different values here
