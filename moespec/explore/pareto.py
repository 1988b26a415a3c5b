"""Exact Pareto fronts, vectorised, and their running merge over chunks.

Convention: every objective is to be *minimised* here (callers negate the ones to maximise;
`to_costs` does it). Design p dominates q when p <= q on every objective and p < q on at
least one. The front is every design no other design dominates.

Ties: designs with identical objective vectors do not dominate one another, so the front
keeps *all* of them (two different designs that are equally good are both answers). The
front is returned in ascending design id, whatever the chunking, so a front computed in
chunks is the one-shot front, element for element (tests/test_pareto.py checks both).

Cost: the points are visited in ascending order of the sum of their min-max normalised costs,
ties broken lexicographically. If q dominates p, q's sum is at most p's (normalising and
adding are monotone, in floating point too) and q comes first lexicographically, so a visited
point is never dominated by a later one: each visit is a front member that removes everything
it dominates from the remaining points, O(n * front size * objectives) with numpy doing the
inner loop. Balanced points come first and prune the most.
"""

from __future__ import annotations

import numpy as np


def to_costs(values: np.ndarray, maximise: np.ndarray) -> np.ndarray:
    """(n, m) objective values -> (n, m) costs to minimise (maximised columns negated)."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.asarray(maximise, dtype=bool)[None, :], -values, values)


def pareto_mask(costs: np.ndarray) -> np.ndarray:
    """(n,) bool: True for the non-dominated rows of `costs` (n, m), minimising every column.
    NaN rows are never on the front (filter them before, this is a guard)."""
    costs = np.asarray(costs, dtype=np.float64)
    n = len(costs)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    order = np.flatnonzero(np.all(np.isfinite(costs), axis=1))
    finite = costs[order]
    if len(order) == 0:
        return keep
    low, span = finite.min(axis=0), np.ptp(finite, axis=0)
    scaled_sum = ((finite - low) * np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 0.0)).sum(axis=1)
    order = order[np.lexsort((*finite.T[::-1], scaled_sum))]  # by scaled sum, then column 0, 1, ...
    columns = costs[order].T.copy()  # (m, r): column-wise compares beat all/any over rows
    alive = order
    while len(alive):
        keep[alive[0]] = True
        best, rest = columns[:, 0], columns[:, 1:]
        no_worse = rest[0] >= best[0]  # rest is no better than best on every objective ...
        worse = rest[0] > best[0]  # ... and worse on one: dominated by best
        for j in range(1, len(best)):
            no_worse &= rest[j] >= best[j]
            worse |= rest[j] > best[j]
        survive = ~(no_worse & worse)
        alive, columns = alive[1:][survive], rest[:, survive]
    return keep


def merge_front(front_ids: np.ndarray, front_costs: np.ndarray, ids: np.ndarray, costs: np.ndarray):
    """The front of (running front) + (new candidates): (ids ascending, their costs).
    Ids must be unique across the two sets (they are design ids)."""
    all_ids = np.concatenate([front_ids, ids])
    all_costs = np.concatenate([front_costs, costs]) if len(front_costs) else np.asarray(costs, dtype=np.float64)
    mask = pareto_mask(all_costs)
    kept_ids, kept_costs = all_ids[mask], all_costs[mask]
    order = np.argsort(kept_ids, kind="stable")
    return kept_ids[order], kept_costs[order]


def dominates_brute(costs: np.ndarray) -> np.ndarray:
    """The obvious O(n^2 m) oracle: (n,) bool, True where no other row dominates. For tests."""
    costs = np.asarray(costs, dtype=np.float64)
    le = np.all(costs[:, None, :] <= costs[None, :, :], axis=2)  # le[p, q]: p <= q everywhere
    lt = np.any(costs[:, None, :] < costs[None, :, :], axis=2)
    dominated = np.any(le & lt, axis=0)
    return ~dominated
