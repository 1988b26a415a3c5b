"""The design space of a sweep: design ids -> DesignBatch columns, lazily, chunk by chunk.

Design id: a mixed-radix number over the axes, structural axes outermost (in sweep order),
then fast axes (in sweep order), the last one varying fastest. A chunk of ids becomes a
`DesignBatch` by taking the resolved row of each id's structural combination and writing the
fast axes' values into their columns: no SpecPlan per design.

The spec rules a fast value can break (ep divides dp and E, k <= E, tp divides the heads, ...)
are checked here by the spec layer's own rule functions (moespec/spec/rules.py) evaluated on
the batch's columns, and each failing design gets a reason code; `design_plan(id)`
is the slow twin (edit the spec, resolve it) that `--emit` uses and that the tests hold the
fast path to, design by design.

Inert values: an axis can have no effect on a design (capacity.factor under BASE routing or
dropless capacity, shared_d_ff without shared experts, every MoE field of a dense structure).
Such designs would repeat one another, so the one with the axis's first value stands for them
and the others are counted as duplicates, never silently dropped.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import numpy as np

from moespec.explore.axes import Axis, show_value
from moespec.explore.sweep import Sweep
from moespec.sim.design import PRECISIONS, RECOMPUTE, DesignBatch, require_uniform
from moespec.spec import SpecErrors, SpecPlan
from moespec.spec.rules import MOE_RULES, PARALLEL_RULES, RULES
from moespec.spec.stages import PP_SCHEDULES
from moespec.spec.resolve import resolve
from moespec.spec.schema import load_schema, schema_errors
from moespec.spec.yaml_source import Locations

FEASIBLE = 0
_TOPK_STYLE = ("topk", "noisy_topk", "sigmoid_bias", "sparsemixer")  # routers with a k field
_PARALLEL_FIELDS = ("dp", "ep", "tp", "pp", "micro_batch", "global_batch", "precision", "zero_stage", "recompute", "pp_schedule", "sequence_parallel")
_MOE_FIELDS = ("experts", "expert_d_ff", "shared_count", "shared_d_ff", "k", "capacity_factor", "min_capacity")
_CODES = {"precision": PRECISIONS, "recompute": RECOMPUTE, "pp_schedule": PP_SCHEDULES}


@dataclass(frozen=True)
class Structure:
    """One combination of structural axis values and the spec resolved from it."""

    values: tuple
    plan: SpecPlan | None
    error: str  # why the spec layer refused it; '' when it resolved
    shared_d_ff_written: bool  # else shared experts follow experts.d_ff


@dataclass(frozen=True)
class Chunk:
    index: np.ndarray  # (n,) design ids
    batch: DesignBatch  # (n,) designs, dp filled in
    reason: np.ndarray  # (n,) int16: FEASIBLE or a code into DesignSpace.reasons
    digits: np.ndarray  # (n, axes) value index per axis, in DesignSpace.order


class DesignSpace:
    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.order: tuple[Axis, ...] = tuple([a for a in sweep.axes if not a.fast] + [a for a in sweep.axes if a.fast])
        self.n_structural = sum(not a.fast for a in sweep.axes)
        self.radices = np.array([len(a.values) for a in self.order], dtype=np.int64)
        self.size = int(np.prod(self.radices)) if len(self.radices) else 1
        self.strides = np.array([int(np.prod(self.radices[i + 1 :])) for i in range(len(self.order))], dtype=np.int64)
        self.fast_axes = self.order[self.n_structural :]
        self.fast_fields = {a.field for a in self.fast_axes}
        self.derive_dp = sweep.constraints.world == "equal" and not any(a.field == "dp" for a in self.fast_axes)
        raw_parallel = sweep.base_spec.get("parallelism") or {}
        self.global_follows = raw_parallel.get("global_batch") is None and not any(a.field == "global_batch" for a in self.fast_axes)
        self.reasons: list[str] = ["feasible"]
        self.structures = [self._structure(values) for values in itertools.product(*(a.values for a in self.order[: self.n_structural]))]
        self._per_structure()
        self._fast_columns = [self._coded(axis) for axis in self.fast_axes]

    # --- codes ------------------------------------------------------------------------------

    def code(self, reason: str) -> int:
        """The code of a reason text, registered on first use (stable per space)."""
        if reason not in self.reasons:
            self.reasons.append(reason)
        return self.reasons.index(reason)

    # --- structures -------------------------------------------------------------------------

    def _structure(self, values: tuple) -> Structure:
        spec = self.sweep.base_spec_copy()
        for axis, value in zip(self.order, values):
            write_path(spec, axis.path, value)
        written = ((spec.get("moe") or {}).get("experts") or {}).get("shared_d_ff") is not None
        # Resolve with neutral parallelism (and k = 1 where k is swept): those fields vary per
        # design and are checked vectorised, so the base values must not fail a structure.
        spec["parallelism"] = {key: value for key, value in (spec.get("parallelism") or {}).items()
                               if key in ("precision", "zero_stage", "recompute")}  # fmt: skip
        router = (spec.get("moe") or {}).get("router") or {}
        if any(a.field == "k" for a in self.fast_axes) and router.get("type", "topk") in _TOPK_STYLE:
            router["k"] = 1
        try:
            plan = resolve_spec(spec)
            require_uniform(plan)
        except (SpecErrors, ValueError) as failure:
            text = failure.errors[0] if isinstance(failure, SpecErrors) else failure
            message = f"{text.path}: {text.message}" if isinstance(failure, SpecErrors) else str(text)
            return Structure(values, None, f"spec rule: {message}", written)
        return Structure(values, plan, "", written)

    def _per_structure(self) -> None:
        """Rows and facts of each structure, as (S,) arrays for take()."""
        base = self.sweep.base_plan
        plans = [s.plan or base for s in self.structures]
        restore = {name: getattr(DesignBatch.from_plans([base]), name) for name in _PARALLEL_FIELDS}
        self.rows = DesignBatch.from_plans(plans).replace(**{name: value[0] for name, value in restore.items()})
        routers = [p.moe_layers[0].moe.router if p.moe_layers else None for p in plans]
        capacities = [p.moe_layers[0].moe.capacity if p.moe_layers else None for p in plans]
        self.structure_error = np.array([self.code(s.error) if s.error else FEASIBLE for s in self.structures], dtype=np.int16)
        self.router_type = [r.type if r else "none" for r in routers]
        self.moe_free = np.array([r is None for r in routers])
        self.fixed_k = np.array([r is not None and r.type not in _TOPK_STYLE for r in routers])
        self.rule_applies = {rule.name: np.array([r is not None and rule.applies(r) for r in routers]) for rule in MOE_RULES}
        self.n_groups = np.array([getattr(r, "n_groups", 1) for r in routers], dtype=np.int64)
        self.topk_groups = np.array([getattr(r, "topk_groups", 1) for r in routers], dtype=np.int64)
        self.no_capacity = np.array([c is None for c in capacities])  # BASE (or dense)
        self.dropless = np.array([c is None or c.dropless for c in capacities])
        self.shared_follows = np.array([not s.shared_d_ff_written for s in self.structures])

    def _coded(self, axis: Axis) -> np.ndarray:
        codes = _CODES.get(axis.field)
        values = [codes.index(v) for v in axis.values] if codes else list(axis.values)
        return np.array(values, dtype=np.float64 if axis.field == "capacity_factor" else np.int64)

    # --- chunks -----------------------------------------------------------------------------

    def digits(self, index: np.ndarray) -> np.ndarray:
        """(n, axes) value index of each design on each axis, in `order`."""
        return (index[:, None] // self.strides[None, :]) % self.radices[None, :]

    def chunk(self, index: np.ndarray) -> Chunk:
        index = np.asarray(index, dtype=np.int64)
        digits = self.digits(index)
        s = self.structure_of(index)
        rows = self.rows.take(s)
        reason = self.structure_error[s].copy()
        raw = self._raw_fast(digits)
        if "k" in raw:  # a wrong spec before a duplicate; valid one-expert designs keep k = 1
            wrong_k = ~self.moe_free[s] & self.fixed_k[s] & (raw["k"] != 1)
            _flag(reason, wrong_k, self.code("moe.router.k does not apply: this router sends each token to exactly one expert"))
        columns = {}
        for j, axis in enumerate(self.fast_axes):
            inert = self._inert(axis, s, raw, rows)
            columns[axis.field] = raw[axis.field]
            if inert is not None:
                columns[axis.field] = np.where(inert, getattr(rows, axis.field), raw[axis.field])
                _flag(reason, inert & (digits[:, self.n_structural + j] != 0), self.code(f"duplicate: {axis.name} has no effect on this design"))
        if self.fast_fields & {"shared_count", "expert_d_ff", "shared_d_ff"}:
            columns.update(self._shared_experts(s, columns, rows))
        batch, reason = self._parallel_rules(rows.replace(**columns), s, reason)
        return Chunk(index, batch, reason, digits)

    def structure_of(self, index: np.ndarray) -> np.ndarray:
        return index // int(np.prod(self.radices[self.n_structural :]))

    def _raw_fast(self, digits: np.ndarray) -> dict[str, np.ndarray]:
        return {axis.field: self._fast_columns[j][digits[:, self.n_structural + j]] for j, axis in enumerate(self.fast_axes)}

    def _inert(self, axis: Axis, s: np.ndarray, raw: dict, rows: DesignBatch) -> np.ndarray | None:
        """Where `axis` cannot change the design (None: nowhere). A k on a one-expert router
        is not inert but wrong unless it is 1 (see chunk)."""
        if axis.field not in _MOE_FIELDS:
            return None
        inert = self.moe_free[s]
        if axis.field == "capacity_factor":
            inert = inert | self.dropless[s]
        elif axis.field == "min_capacity":
            inert = inert | self.no_capacity[s]
        elif axis.field == "shared_d_ff":
            inert = inert | (raw.get("shared_count", rows.shared_count) == 0)
        return inert

    def _shared_experts(self, s: np.ndarray, columns: dict, rows: DesignBatch) -> dict:
        """Shared-expert width and gate as resolve.py fills them in: shared_d_ff defaults to
        experts.d_ff (so it follows a swept d_ff unless the spec wrote it), and without shared
        experts both take their defaults."""
        expert_d_ff = columns.get("expert_d_ff", rows.expert_d_ff)
        own = columns["shared_d_ff"] if "shared_d_ff" in columns else np.where(self.shared_follows[s], expert_d_ff, rows.shared_d_ff)
        none = columns.get("shared_count", rows.shared_count) == 0
        return {"shared_d_ff": np.where(none, expert_d_ff, own), "shared_gate": np.where(none, False, rows.shared_gate)}

    def _parallel_rules(self, b: DesignBatch, s: np.ndarray, reason: np.ndarray):
        """The spec layer's rules (moespec/spec/rules.py) on the designs' columns, the same
        functions resolve.py calls on one spec; fills dp (and global_batch) first. A design's
        reason is the first rule it breaks, and a rule's reason text is its `short`."""
        if self.derive_dp:  # the world constraint, before the rules that read dp
            devices, shard = self.sweep.backend.num_devices, b.tp * b.pp
            _flag(reason, devices % shard != 0, self.code("tp * pp does not divide the backend's devices"))
            b = b.replace(dp=np.maximum(devices // shard, 1))
        if self.global_follows:
            b = b.replace(global_batch=b.micro_batch * b.dp)
        values = {name: getattr(b, name) for rule in RULES for name in rule.inputs if name not in ("n_groups", "topk_groups")}
        values.update(n_groups=self.n_groups[s], topk_groups=self.topk_groups[s])
        for rule in PARALLEL_RULES:
            _flag(reason, rule.check(values), self.code(rule.short))
        for rule in MOE_RULES:
            _flag(reason, self.rule_applies[rule.name][s] & rule.check(values), self.code(rule.short))
        return b, reason

    # --- reporting and the slow path --------------------------------------------------------

    def axis_values(self, index: np.ndarray) -> dict[str, list]:
        """Axis name -> the value of each design (sweep order); None where the axis is inert."""
        index = np.asarray(index, dtype=np.int64)
        digits = self.digits(index)
        s = self.structure_of(index)
        raw = self._raw_fast(digits)
        out = {}
        for position, axis in enumerate(self.order):
            values = [axis.values[d] for d in digits[:, position]]
            inert = self._inert(axis, s, raw, self.rows.take(s)) if axis.fast else None
            out[axis.name] = values if inert is None else [None if flag else v for v, flag in zip(values, inert)]
        return {axis.name: out[axis.name] for axis in self.sweep.axes}

    def design_spec(self, design: int, name: str | None = None) -> dict:
        """The spec of one design, written out: base + every axis value (+ derived dp)."""
        chunk = self.chunk(np.array([design]))
        values = self.axis_values(chunk.index)
        one_expert = bool(self.fixed_k[self.structure_of(chunk.index)][0])
        spec = self.sweep.base_spec_copy()
        for axis in self.order:  # structural first: a router type decides whether k is written
            value = values[axis.name][0]
            if value is None or (axis.field == "k" and one_expert and value == 1):
                continue  # inert, or the k a one-expert router has without saying
            write_path(spec, axis.path, value)
        experts = (spec.get("moe") or {}).get("experts") or {}
        if experts.get("shared_count", 1) == 0:
            experts.pop("shared_d_ff", None)
            experts.pop("shared_gate", None)
        if self.derive_dp:
            spec.setdefault("parallelism", {})["dp"] = int(chunk.batch.dp[0])
        parallel = spec.get("parallelism") or {}
        if parallel.get("tp", 1) == 1:  # a base's sequence parallelism has no tp ranks to split over in this design
            parallel.pop("sequence_parallel", None)
        spec["name"] = name or f"{self.sweep.name}-d{design}"
        shown = ", ".join(f"{k}={show_value(v[0])}" for k, v in values.items() if v[0] is not None)
        spec["description"] = f"Design {design} of sweep {self.sweep.name} ({self.sweep.file}): {shown}"
        return spec

    def design_plan(self, design: int) -> SpecPlan:
        """The slow path: resolve the written-out spec (raises SpecErrors for an invalid design)."""
        return resolve_spec(self.design_spec(design))


def _flag(reason: np.ndarray, mask: np.ndarray, code: int) -> None:
    """Give `code` to designs in `mask` that have no reason yet (the first reason counts)."""
    reason[(reason == FEASIBLE) & mask] = code


def write_path(spec: dict, path: tuple[str, ...], value) -> None:
    """Set spec[path] = value, creating mappings on the way. Changing a tagged union's type
    keeps only the keys the new variant takes, a BASE router drops moe.capacity (BASE layers
    have none) and dropless capacity drops its factors (it has none), so that
    `moe.router.type: [topk, switch]` or `moe.capacity.dropless: [false, true]` mean what they
    say over any base."""
    node = spec
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = copy.deepcopy(value)
    for union in ("router", "placement"):
        if path in (("moe", union), ("moe", union, "type")):
            _prune_variant(spec["moe"], union)
    moe = spec.get("moe") or {}
    if (moe.get("router") or {}).get("type") == "base":
        moe.pop("capacity", None)
    capacity = moe.get("capacity")
    if isinstance(capacity, dict) and capacity.get("dropless") is True:
        capacity.pop("factor", None)
        capacity.pop("eval_factor", None)


def _prune_variant(moe: dict, union: str) -> None:
    node = moe.get(union)
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        return
    definition = load_schema("spec")["$defs"].get(f"{union}_{node['type']}")
    if definition is not None:
        allowed = definition["properties"]
        for key in [k for k in node if k not in allowed]:
            del node[key]


def resolve_spec(spec: dict) -> SpecPlan:
    """Schema check + resolve of a spec mapping that has no file (errors locate to 1:1)."""
    locations = Locations("<design>")
    errors = schema_errors(spec, locations)
    if errors:
        raise SpecErrors(errors)
    return resolve(spec, locations)
