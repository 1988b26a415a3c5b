"""Multi-objective search for design spaces too large to enumerate (10^9-10^12 designs).

Two phases within one budget of simulated designs:
1. Global: NSGA-II from pymoo (a maintained implementation, not a genetic algorithm of our own)
   over the design's digits, one integer per axis with a choice (the mixed-radix number of
   space.py). Each generation is evaluated at once through the vectorised cost model
   (`run.assess`); infeasible designs (a spec rule, memory, a bound) carry a constraint
   violation. pymoo keeps each individual as a Python object (~1 ms per design here), so it
   gets a bounded share of the budget: enough generations to find the front's regions.
2. Local: Pareto local search from the archive's front. Every design that differing from a
   front design in one axis is evaluated, in chunks of the same vectorised model (~10^6
   designs/s), and the front is updated; designs that join it are expanded in turn, until the
   budget is spent or no front design has an unevaluated neighbour (a local Pareto optimum).
   Many axes trade off smoothly (experts, widths, batch sizes), so one-axis moves reach the
   front's neighbours that the crossover of phase 1 finds only by chance.

What is returned is the exact Pareto front of every distinct feasible design evaluated
(`run.Summary`), with a sample and the top designs as exhaustive exploration gives them.
`bench/explore_search.py` measures how close it comes to the exact front on spaces small
enough to enumerate (hypervolume ratio).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from moespec.explore.pareto import to_costs
from moespec.explore.run import DEFAULT_CHUNK, ExploreResult, Summary, assess
from moespec.explore.space import FEASIBLE, DesignSpace
from moespec.explore.sweep import Sweep
from moespec.sim.cost import CollectiveCosts

DEFAULT_BUDGET = 1_000_000  # designs simulated by a search when --budget is not given
POPULATION = 200


class SearchUnavailable(RuntimeError):
    """pymoo is not installed (an optional extra)."""


def global_share(budget: int) -> int:
    """Evaluations given to NSGA-II: a fifth of a small budget, at most 20,000 (~20 s here)."""
    return int(min(budget, max(2 * POPULATION, min(budget // 5, 20_000))))


def search(sweep: Sweep, *, budget: int = DEFAULT_BUDGET, seed: int = 0, sample_size: int = 1000, top: int = 0,
           rank_by: str | None = None, progress: Callable[..., None] | None = None) -> ExploreResult:  # fmt: skip
    """Search `sweep`'s space for `budget` simulated designs (seeded: the same seed, the same
    front). `progress(evaluated, budget, front_size)` after each generation or chunk."""
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.callback import Callback
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling
        from pymoo.optimize import minimize
    except ImportError:
        raise SearchUnavailable("searching a large space needs pymoo: pip install 'moespec[search]' (or pymoo)") from None

    start = time.perf_counter()
    state = _State(sweep, sample_size=sample_size, top=top, rank_by=rank_by, seed=seed, budget=budget, progress=progress)
    free = state.free

    class Designs(Problem):
        def __init__(self):
            super().__init__(n_var=len(free), n_obj=len(sweep.objectives), n_ieq_constr=1, xl=0, xu=state.space.radices[free] - 1, vtype=int)

        def _evaluate(self, X, out, *args, **kwargs):
            digits = np.zeros((len(X), len(state.space.radices)), dtype=np.int64)
            digits[:, free] = np.clip(np.rint(X).astype(np.int64), 0, state.space.radices[free] - 1)
            out["F"], out["G"] = state.evaluate(digits @ state.space.strides)

    class Report(Callback):
        def notify(self, algorithm):
            state.report()

    operators = dict(sampling=IntegerRandomSampling(), crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                     mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)  # fmt: skip
    generations = 0
    if len(free) == 0:  # one design: nothing to search
        state.evaluate(np.zeros(1, dtype=np.int64))
    else:
        outcome = minimize(Designs(), NSGA2(pop_size=POPULATION, **operators), ("n_eval", global_share(budget)),
                           seed=seed % 2**32, callback=Report(), verbose=False)  # fmt: skip
        generations = int(outcome.algorithm.n_gen or 0)
    global_evaluated = state.evaluated
    converged = state.local_search()
    return state.summary.result(state.space, state.collectives, designs=len(state.seen), elapsed_s=time.perf_counter() - start, search={
        "algorithm": "NSGA-II (pymoo), then Pareto local search", "budget": budget, "evaluated": state.evaluated,
        "distinct": len(state.seen), "space": state.space.size, "global_evaluated": global_evaluated,
        "population": POPULATION, "generations": generations, "converged": converged, "seed": seed,
    })  # fmt: skip


class _State:
    """The evaluations of one search: the archive (`Summary`), the designs seen, the budget."""

    def __init__(self, sweep: Sweep, *, sample_size: int, top: int, rank_by, seed: int, budget: int, progress):
        self.sweep, self.budget, self.progress, self.seed = sweep, budget, progress, seed
        self.space = DesignSpace(sweep)
        self.collectives = CollectiveCosts(sweep.backend)
        self.summary = Summary(sweep, sample_size=sample_size, top=top, rank_by=rank_by, seed=seed)
        self.free = np.flatnonzero(self.space.radices > 1)  # axes with a choice: the decision variables
        self.seen = np.empty(0, dtype=np.int64)  # sorted distinct ids evaluated
        self.evaluated = 0

    def evaluate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Costs (minimised) and constraint violation (<= 0 feasible) of `ids`, folding the
        designs not seen before into the archive."""
        unique, inverse = np.unique(ids, return_inverse=True)
        figures, reason = assess(self.space, self.space.chunk(unique), self.collectives)
        self.evaluated += len(unique)
        self._fold(unique, figures, reason)
        values = np.column_stack([figures[o.name] for o in self.sweep.objectives])
        ok = reason == FEASIBLE
        costs = np.where(ok[:, None], to_costs(np.nan_to_num(values), self.summary.maximise), 0.0)
        return costs[inverse], np.where(ok, -1.0, 1.0)[inverse, None]

    def _fold(self, ids: np.ndarray, figures: dict, reason: np.ndarray) -> None:
        new = ~np.isin(ids, self.seen, assume_unique=True)
        if new.any():
            self.summary.fold(ids[new], {name: column[new] for name, column in figures.items()}, reason[new])
            self.seen = np.union1d(self.seen, ids[new])

    def report(self) -> None:
        if self.progress is not None:
            self.progress(min(self.evaluated, self.budget), self.budget, len(self.summary.front_ids))

    def neighbours(self, ids: np.ndarray) -> np.ndarray:
        """Distinct designs one axis away from `ids` (every other value of each free axis)."""
        digits = self.space.digits(ids)
        found = []
        for axis in self.free:
            stride, radix = self.space.strides[axis], int(self.space.radices[axis])
            base = ids - digits[:, axis] * stride  # (n,) the id with this axis at value 0
            values = np.arange(radix)
            moved = base[:, None] + values[None, :] * stride  # (n, radix)
            found.append(moved[values[None, :] != digits[:, axis][:, None]])
        return np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)

    def local_search(self) -> bool:
        """Expand front designs until the budget is spent; True when it stopped because no
        front design had an unevaluated neighbour left."""
        expanded = np.empty(0, dtype=np.int64)
        rng = np.random.default_rng(self.seed)
        while self.evaluated < self.budget:
            todo = np.setdiff1d(self.summary.front_ids, expanded)
            if len(todo) == 0:
                return True
            expanded = np.union1d(expanded, todo)
            candidates = np.setdiff1d(self.neighbours(todo), self.seen)
            room = self.budget - self.evaluated
            if len(candidates) > room:  # the budget ends here: a seeded random share of the neighbours
                candidates = np.sort(rng.choice(candidates, size=room, replace=False))
            for lo in range(0, len(candidates), DEFAULT_CHUNK):
                chunk = candidates[lo : lo + DEFAULT_CHUNK]
                figures, reason = assess(self.space, self.space.chunk(chunk), self.collectives)
                self.evaluated += len(chunk)
                self._fold(chunk, figures, reason)
                self.report()
        return False
