"""explore(sweep) -> ExploreResult: stream the design space through the vectorised simulator.

Memory stays bounded whatever the space: per chunk (65,536 designs by default) the designs
are built (space.py), checked, evaluated (moespec.sim.cost.evaluate), and folded into three
small running summaries, then dropped:
- the exact Pareto front of the feasible designs (pareto.merge_front);
- a uniform sample of the feasible designs: each id gets a pseudo-random key from a hash of
  (seed, id) and the `sample_size` smallest keys are kept (bottom-k sampling), so the sample
  does not depend on the chunk size;
- the best `top` designs by one objective (ties: lower design id first).
Every infeasible design is counted under the first reason it fails, in a fixed order: spec
rules (space.py), then world size, then memory, then the sweep's bounds. Chunks are built and
evaluated on several threads (`ordered_map`) and folded in order, so the result is the
same whatever the thread count.
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from moespec.explore.pareto import merge_front, to_costs
from moespec.explore.quality import describe, quality
from moespec.explore.space import FEASIBLE, Chunk, DesignSpace
from moespec.explore.sweep import Objective, Sweep
from moespec.sim.cost import CollectiveCosts, evaluate

DEFAULT_CHUNK = 65_536
# Figures a sweep can optimise or bound, and their units (for tables and files).
FIGURES = {
    "tokens_per_s": "tokens/s", "step_s": "s", "memory_per_device": "bytes", "params_total": "parameters",
    "params_active": "parameters", "cost_per_token": "device-s/token", "mfu": "fraction of peak",
    "a2a_bytes": "bytes per rank per micro-step", "quality": "proxy (see quality_proxy)",
}  # fmt: skip
_COUNTS = ("params_total", "params_active", "a2a_bytes", "dp", "world")


@dataclass(frozen=True)
class DesignTable:
    """Some designs with their axis values (None: inert) and every figure, ids ascending
    unless ranked."""

    ids: np.ndarray  # (n,)
    axis_values: dict[str, list]  # axis name -> (n,) values
    figures: dict[str, np.ndarray]  # FIGURES + dp, world, quality_extrapolated, fits -> (n,)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self) -> list[dict]:
        """One plain dict per design (JSON-ready numbers; counts as integers)."""
        return [{"design": int(self.ids[i]), **{name: values[i] for name, values in self.axis_values.items()},
                 **{name: _plain(column[i], integer=name in _COUNTS) for name, column in self.figures.items()}}
                for i in range(len(self.ids))]  # fmt: skip


@dataclass(frozen=True)
class ExploreResult:
    sweep: Sweep
    designs: int
    feasible: int
    infeasible_by_reason: dict[str, int]  # first failing reason -> designs, in check order
    front: DesignTable  # the exact Pareto front of the feasible designs
    sample: DesignTable  # a uniform sample of the other feasible designs
    top: DesignTable | None  # best `top` by `rank_by` (None when not asked)
    rank_by: Objective | None
    quality_proxy: str  # which proxy ranked the designs, in words
    elapsed_s: float
    search: dict | None = None  # how a space too large to enumerate was searched (explore/search.py); None: every design

    @property
    def designs_per_s(self) -> float:
        return self.designs / self.elapsed_s if self.elapsed_s > 0 else float("inf")


def explore(sweep: Sweep, *, chunk_size: int = DEFAULT_CHUNK, sample_size: int = 1000, top: int = 0,
            rank_by: str | None = None, seed: int = 0, threads: int | None = None,
            progress: Callable[..., None] | None = None) -> ExploreResult:  # fmt: skip
    """Evaluate every design of `sweep`; `progress(done, total, front_size)` is called after each chunk.
    `threads`: chunks evaluated at once (default: the CPUs this process may use); the result
    does not depend on it, chunks are folded in order."""
    threads = threads or default_threads()
    start = time.perf_counter()
    space = DesignSpace(sweep)
    collectives = CollectiveCosts(sweep.backend)
    summary = Summary(sweep, sample_size=sample_size, top=top, rank_by=rank_by, seed=seed)

    def build_and_assess(lo: int):
        ids = np.arange(lo, min(lo + chunk_size, space.size), dtype=np.int64)
        return (ids, *assess(space, space.chunk(ids), collectives))

    for ids, figures, reason in ordered_map(build_and_assess, range(0, space.size, chunk_size), workers=threads):
        summary.fold(ids, figures, reason)
        if progress is not None:
            progress(int(ids[-1]) + 1, space.size, len(summary.front_ids))
    return summary.result(space, collectives, designs=space.size, elapsed_s=time.perf_counter() - start)


class Summary:
    """The running summaries of evaluated designs (exact front, bottom-k sample, best `top`,
    counts by reason), folded chunk by chunk: shared by exhaustive exploration and search."""

    def __init__(self, sweep: Sweep, *, sample_size: int, top: int, rank_by: str | None, seed: int):
        self.sweep, self.sample_size, self.top_k, self.seed = sweep, sample_size, top, seed
        self.objectives = sweep.objectives
        self.maximise = np.array([o.direction == "max" for o in self.objectives])
        self.ranked = _rank_objective(sweep, rank_by) if top else None
        self.front_ids, self.front_costs = np.empty(0, dtype=np.int64), np.empty((0, len(self.objectives)))
        self.sample_ids, self.sample_keys = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint64)
        self.top_ids, self.top_costs = np.empty(0, dtype=np.int64), np.empty(0)
        self.counts: dict[int, int] = {}

    def fold(self, ids: np.ndarray, figures: dict, reason: np.ndarray) -> None:
        """Add designs (ids unique, never folded before) with their figures and reason codes."""
        for code, count in zip(*np.unique(reason, return_counts=True)):
            self.counts[int(code)] = self.counts.get(int(code), 0) + int(count)
        ok = reason == FEASIBLE
        if not ok.any():
            return
        good = ids[ok]
        values = np.column_stack([figures[o.name][ok] for o in self.objectives])
        self.front_ids, self.front_costs = merge_front(self.front_ids, self.front_costs, good, to_costs(values, self.maximise))
        self.sample_ids, self.sample_keys = _bottom_k(np.concatenate([self.sample_ids, good]),
                                                      np.concatenate([self.sample_keys, _keys(good, self.seed)]), self.sample_size)  # fmt: skip
        if self.ranked is not None:
            sign = -1.0 if self.ranked.direction == "max" else 1.0
            self.top_ids, self.top_costs = _best(np.concatenate([self.top_ids, good]),
                                                 np.concatenate([self.top_costs, sign * figures[self.ranked.name][ok]]), self.top_k)  # fmt: skip

    def result(self, space: DesignSpace, collectives: CollectiveCosts, *, designs: int, elapsed_s: float,
               search: dict | None = None) -> ExploreResult:  # fmt: skip
        sample_ids = np.setdiff1d(np.sort(self.sample_ids), self.front_ids)
        return ExploreResult(
            sweep=self.sweep, designs=designs, feasible=self.counts.get(FEASIBLE, 0),
            infeasible_by_reason={space.reasons[c]: self.counts[c] for c in sorted(self.counts) if c != FEASIBLE},
            front=table(space, self.front_ids, collectives), sample=table(space, sample_ids, collectives),
            top=table(space, self.top_ids, collectives) if self.ranked is not None else None, rank_by=self.ranked,
            quality_proxy=describe(self.sweep.quality_proxy, self.sweep.clark2022_fit), elapsed_s=elapsed_s, search=search,
        )  # fmt: skip


def default_threads() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def ordered_map(fn, items, *, workers: int):
    """fn over items on `workers` threads, results yielded in order, at most 2 * workers in
    flight (memory stays bounded on a huge space). numpy releases the GIL in its array
    operations, which are nearly all of a chunk's evaluation: on 2 cores the explorer's
    throughput rises ~1.5x (bench/sim_speed.py prints both)."""
    items = iter(items)
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(items, 2 * workers))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(items, 1):
                pending.append(pool.submit(fn, item))
            yield result


def assess(space: DesignSpace, chunk: Chunk, collectives: CollectiveCosts) -> tuple[dict, np.ndarray]:
    """Figures of a chunk's designs (NaN where not evaluated) and each one's reason code.
    Only designs that pass the spec rules and the world size are simulated."""
    sweep, b = space.sweep, chunk.batch
    reason = chunk.reason.copy()
    world = b.dp * b.tp * b.pp
    devices = sweep.backend.num_devices
    if sweep.constraints.world == "equal":
        _flag(reason, world != devices, space.code(f"world (dp * tp * pp) is not the backend's {devices} devices"))
    else:
        _flag(reason, world > devices, space.code(f"world (dp * tp * pp) exceeds the backend's {devices} devices"))
    n = len(b)
    figures = _unevaluated(n) | {"dp": b.dp.copy(), "world": world}
    run = np.flatnonzero(reason == FEASIBLE)
    if len(run) == 0:
        return figures, reason
    sub = b if len(run) == n else b.take(run)
    out = evaluate(sub, sweep.backend, overlap=sweep.overlap, imbalance=sweep.imbalance, collectives=collectives)
    structure = space.structure_of(chunk.index[run])
    q, extrapolated = quality(sweep.quality_proxy, out, sub, space.router_type, structure, sweep.clark2022_fit)
    found = {
        "tokens_per_s": out["tokens_per_s"], "step_s": out["step_s"], "memory_per_device": out["memory_total_bytes"],
        "params_total": out["params_total"], "params_active": out["params_active"],
        "cost_per_token": world[run] / out["tokens_per_s"], "mfu": out["mfu"], "a2a_bytes": out["a2a_bytes"],
        "quality": q, "quality_extrapolated": extrapolated, "fits": out["fits"],
    }  # fmt: skip
    for name, value in found.items():
        figures[name][run] = value
    simulated = np.zeros(n, dtype=bool)
    simulated[run] = out["valid"]
    _flag(reason, (reason == FEASIBLE) & ~simulated, space.code("the simulator cannot evaluate it"))
    if sweep.constraints.fits_memory:
        _flag(reason, ~figures["fits"], space.code(f"does not fit in device memory ({sweep.backend.device.memory_bytes / 2**30:.1f} GiB)"))
    for bound in sweep.constraints.bounds:
        value = figures[bound.figure]
        broken = value > bound.limit if bound.kind == "max" else value < bound.limit
        _flag(reason, broken, space.code(f"{bound.key} not met"))
    return figures, reason


def table(space: DesignSpace, ids: np.ndarray, collectives: CollectiveCosts) -> DesignTable:
    """Axis values and figures of some designs (re-evaluated: a few hundred at most)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return DesignTable(ids, {axis.name: [] for axis in space.sweep.axes}, _unevaluated(0))
    figures, _ = assess(space, space.chunk(ids), collectives)
    return DesignTable(ids, space.axis_values(ids), figures)


def _unevaluated(n: int) -> dict[str, np.ndarray]:
    figures = {name: np.full(n, np.nan) for name in FIGURES}
    return figures | {"dp": np.zeros(n, dtype=np.int64), "world": np.zeros(n, dtype=np.int64),
                      "fits": np.zeros(n, dtype=bool), "quality_extrapolated": np.zeros(n, dtype=bool)}  # fmt: skip


def _rank_objective(sweep: Sweep, name: str | None) -> Objective:
    if name is None:
        return sweep.objectives[0]
    for objective in sweep.objectives:
        if objective.name == name:
            return objective
    if name not in FIGURES:
        raise ValueError(f"cannot rank by {name!r}: not a figure; choose one of {', '.join(FIGURES)}")
    direction = "min" if name in ("step_s", "memory_per_device", "cost_per_token", "a2a_bytes") else "max"
    if name == "quality":
        direction = "min" if sweep.quality_proxy == "clark2022" else "max"
    return Objective(name, direction)


def _flag(reason: np.ndarray, mask: np.ndarray, code: int) -> None:
    reason[(reason == FEASIBLE) & mask] = code


def _keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, id): a fixed pseudo-random key per design."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _bottom_k(ids: np.ndarray, keys: np.ndarray, k: int):
    if len(ids) <= k:
        return ids, keys
    keep = np.argpartition(keys, k - 1)[:k]
    return ids[keep], keys[keep]


def _best(ids: np.ndarray, costs: np.ndarray, k: int):
    order = np.lexsort((ids, costs))[:k]  # by cost, then by id
    return ids[order], costs[order]


def _plain(value, *, integer: bool = False):
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if np.isnan(value) else int(value) if integer else float(value)
    return value
