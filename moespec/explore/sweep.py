"""Sweep file -> schema check -> frozen `Sweep`: the question `moespec explore` answers.

Errors are the spec layer's: every one found, each one located line (`file:line:col: path:
what; fix`), raised as `SpecErrors`. The base spec and the backend are loaded here too, so a
`Sweep` is complete: nothing later reads a file.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Mapping

from moespec.explore.axes import MAX_STRUCTURES, Axis, parse_axis
from moespec.sim.backend import Backend, backend_from_text, load_backend
from moespec.sim.design import DesignBatch
from moespec.spec import SpecPlan
from moespec.spec.errors import SpecError, SpecErrors
from moespec.spec.resolve import resolve
from moespec.spec.schema import load_schema, parse_checked
from moespec.spec.yaml_source import Locations, read_spec_text

Direction = Literal["max", "min"]
# Constraint key -> (figure it bounds, "max" or "min" bound, unit scale to the figure's unit)
BOUNDS: dict[str, tuple[str, str, float]] = {
    "max_memory_per_device_gib": ("memory_per_device", "max", 2.0**30),
    "min_tokens_per_s": ("tokens_per_s", "min", 1.0),
    "max_step_s": ("step_s", "max", 1.0),
    "min_mfu": ("mfu", "min", 1.0),
    "min_params_total": ("params_total", "min", 1.0),
    "max_params_total": ("params_total", "max", 1.0),
    "min_params_active": ("params_active", "min", 1.0),
    "max_params_active": ("params_active", "max", 1.0),
    "max_cost_per_token": ("cost_per_token", "max", 1.0),
}
PROXY_DIRECTION = {"clark2022": "min", "params_total": "max", "params_active": "max"}


MAX_SPACE = 10**18

@dataclass(frozen=True)
class Objective:
    name: str  # a figure of run.FIGURES
    direction: Direction


@dataclass(frozen=True)
class Bound:
    key: str  # as written in the sweep, e.g. max_memory_per_device_gib
    figure: str  # the figure it bounds, e.g. memory_per_device (bytes)
    kind: Literal["max", "min"]
    limit: float  # in the figure's unit


@dataclass(frozen=True)
class Constraints:
    world: Literal["equal", "at_most"]
    fits_memory: bool
    bounds: tuple[Bound, ...]


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    file: str
    base_file: Path
    base_spec: Mapping = field(repr=False)  # the base spec as written (read-only; copy before editing)
    base_plan: SpecPlan = field(repr=False)
    backend: Backend
    axes: tuple[Axis, ...]  # in sweep order
    constraints: Constraints
    objectives: tuple[Objective, ...]
    quality_proxy: str
    clark2022_fit: str
    overlap: float
    imbalance: float
    max_designs: int  # the largest space `explore` evaluates whole without --exhaustive; larger ones are searched

    @property
    def size(self) -> int:
        total = 1
        for axis in self.axes:
            total *= len(axis.values)
        return total

    def base_spec_copy(self) -> dict:
        return copy.deepcopy(dict(self.base_spec))


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; raises SpecErrors (never another exception for bad input)."""
    path = Path(path)
    return sweep_from_text(read_spec_text(path, "sweep"), str(path), base_dir=path.parent)


def sweep_from_text(text: str, file: str = "<sweep>", *, base_dir: Path = Path(".")) -> Sweep:
    data, locations = parse_checked(
        text, file, "sweep", not_a_mapping="a sweep is a mapping (version:, name:, base:, backend:, axes:, objectives:); this document is not"
    )
    top = _defaults(load_schema("sweep")["properties"]) | data
    errors = []
    base_file = Path(os.path.normpath(base_dir / top["base"]))
    base = _load_base(base_file, locations, errors)
    backend = _load_backend(top["backend"], base_dir, locations, errors)
    axes = []
    if not top["axes"]:
        errors.append(locations.error(("axes",), "no axes: add at least one spec path to vary, e.g. moe.experts.count: [8, 16]"))
    for key, raw in top["axes"].items():
        axis, problems = parse_axis(key, raw, locations)
        errors += problems
        if axis is not None:
            axes.append(axis)
    objectives = _objectives(top, locations, errors)
    constraints = _constraints(top.get("constraints") or {})
    simulator = _defaults(load_schema("sweep")["$defs"]["simulator"]["properties"]) | (top.get("simulator") or {})
    size = 1
    for axis in axes:
        size *= len(axis.values)
    structures = 1
    for axis in axes:
        structures *= 1 if axis.fast else len(axis.values)
    if structures > MAX_STRUCTURES:
        names = ", ".join(axis.name for axis in axes if not axis.fast)
        errors.append(locations.error(("axes",), f"the structural axes ({names}) make {structures:,} combinations, each resolved as a spec; keep them under {MAX_STRUCTURES:,}"))
    if size > MAX_SPACE:  # design ids are int64; a larger space is a typo, not a question
        errors.append(locations.error(("axes",), f"these axes make {size:.3g} designs, over {MAX_SPACE:.0e} (design ids are 64-bit); narrow an axis"))
    if errors:
        raise SpecErrors(errors)
    base_spec, base_plan = base
    return Sweep(
        name=top["name"], description=top["description"], file=file, base_file=base_file,
        base_spec=MappingProxyType(base_spec), base_plan=base_plan, backend=backend, axes=tuple(axes),
        constraints=constraints, objectives=objectives, quality_proxy=top["quality_proxy"],
        clark2022_fit=top["clark2022_fit"], overlap=float(simulator["overlap"]),
        imbalance=float(simulator["imbalance"]), max_designs=top["max_designs"],
    )  # fmt: skip


def _defaults(properties: dict) -> dict:
    return {key: copy.deepcopy(prop["default"]) for key, prop in properties.items() if "default" in prop}


def _load_base(path: Path, locations: Locations, errors: list[SpecError]):
    """The base spec's data and plan; its own errors are reported in its own file."""
    if not path.is_file():
        errors.append(locations.error(("base",), f"no spec file at {path} (base is relative to the sweep file); check the path"))
        return None
    try:
        data, base_locations = parse_checked(read_spec_text(path), str(path), "spec", not_a_mapping="a spec is a mapping; this document is not")
        plan = resolve(data, base_locations)
    except SpecErrors as failure:
        errors.extend(failure.errors)
        return None
    if plan.model.encoder is not None:
        errors.append(locations.error(("base",), f"{path} is an encoder-decoder; explore sweeps decoder-only specs (simulate an encoder-decoder one design at a time)"))
        return None
    if plan.parallel.pp_layers:
        errors.append(locations.error(("base",), f"{path} sets parallelism.pp_layers, which the simulator does not cost (it splits stages evenly); remove it"))
        return None
    if (data.get("moe") or {}).get("overrides"):
        errors.append(locations.error(("base",), f"{path} has moe.overrides; the explorer needs every MoE layer alike, so use a base without overrides"))
        return None
    try:
        DesignBatch.from_plans([plan])
    except ValueError as exc:
        errors.append(locations.error(("base",), f"{path}: {exc}"))
        return None
    return data, plan


def _load_backend(name: str, base_dir: Path, locations: Locations, errors: list[SpecError]) -> Backend | None:
    is_path = "/" in name or name.endswith((".yaml", ".yml"))
    try:
        if is_path:
            path = base_dir / name
            if not path.is_file():
                errors.append(locations.error(("backend",), f"no backend file at {path} (relative to the sweep file); check the path"))
                return None
            return backend_from_text(read_spec_text(path, "backend"), str(path))
        return load_backend(name)
    except SpecErrors as failure:
        for error in failure.errors:  # a bad name is the sweep's line; a bad file, its own
            errors.append(locations.error(("backend",), error.message, key=False) if not is_path else error)
        return None


def _objectives(top: dict, locations: Locations, errors: list[SpecError]) -> tuple[Objective, ...]:
    objectives = top["objectives"]
    if not objectives:
        errors.append(locations.error(("objectives",), "no objectives: add at least one, e.g. tokens_per_s: max"))
    proxy = top["quality_proxy"]
    if "quality" in objectives and objectives["quality"] != PROXY_DIRECTION[proxy]:
        meaning = "a predicted loss (lower is better)" if proxy == "clark2022" else "a parameter count (higher is better)"
        errors.append(locations.error(("objectives", "quality"), f"quality under quality_proxy {proxy} is {meaning}; write quality: {PROXY_DIRECTION[proxy]}", key=False))
    return tuple(Objective(name, direction) for name, direction in objectives.items())


def _constraints(raw: dict) -> Constraints:
    c = _defaults(load_schema("sweep")["$defs"]["constraints"]["properties"]) | raw
    bounds = tuple(Bound(key, figure, kind, float(c[key]) * scale)
                   for key, (figure, kind, scale) in BOUNDS.items() if c.get(key) is not None)  # fmt: skip
    return Constraints(world=c["world"], fits_memory=c["fits_memory"], bounds=bounds)
