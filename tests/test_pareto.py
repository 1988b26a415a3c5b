"""The Pareto front (moespec.explore.pareto) equals the brute-force O(n^2) definition, on
random data with ties and duplicates, in 1-4 objectives with mixed directions, one-shot and
merged chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest

from moespec.explore.pareto import dominates_brute, merge_front, pareto_mask, pareto_mask_numpy, to_costs


def brute_front(values: np.ndarray, maximise: np.ndarray) -> np.ndarray:
    """Independent of to_costs: p dominates q when p is no worse everywhere and better once."""
    n = len(values)
    better = np.where(maximise, values[:, None, :] > values[None, :, :], values[:, None, :] < values[None, :, :])
    no_worse = np.where(maximise, values[:, None, :] >= values[None, :, :], values[:, None, :] <= values[None, :, :])
    dominated = np.zeros(n, dtype=bool)
    for q in range(n):
        for p in range(n):
            if p != q and no_worse[p, q].all() and better[p, q].any():
                dominated[q] = True
                break
    return ~dominated


def random_values(rng, n: int, m: int) -> np.ndarray:
    """Few distinct levels per objective, so ties and exact duplicates are common."""
    values = rng.integers(0, 5, size=(n, m)).astype(np.float64) * rng.choice([0.5, 3.0, 1e6], size=m)
    values[rng.integers(0, n, size=n // 10)] = values[0]  # a cluster of duplicates of row 0
    return values


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_front_equals_brute_force_with_ties_and_mixed_directions(m):
    rng = np.random.default_rng(m)
    for _ in range(25):
        values = random_values(rng, int(rng.integers(1, 120)), m)
        maximise = rng.random(m) < 0.5
        expected = brute_front(values, maximise)
        assert np.array_equal(pareto_mask(to_costs(values, maximise)), expected)
        assert np.array_equal(pareto_mask_numpy(to_costs(values, maximise)), expected)  # the path without moocore
        assert np.array_equal(dominates_brute(to_costs(values, maximise)), expected)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_running_merge_over_chunks_equals_one_shot(m, chunk):
    rng = np.random.default_rng(10 * m + chunk)
    values = random_values(rng, 400, m)
    costs = to_costs(values, rng.random(m) < 0.5)
    ids = np.arange(len(costs)) * 3 + 5  # design ids need not be positions
    front_ids, front_costs = np.empty(0, dtype=np.int64), np.empty((0, m))
    for lo in range(0, len(costs), chunk):
        front_ids, front_costs = merge_front(front_ids, front_costs, ids[lo : lo + chunk], costs[lo : lo + chunk])
    expected = ids[pareto_mask(costs)]  # ascending, as ids are
    assert np.array_equal(front_ids, expected)
    assert np.array_equal(front_costs, costs[np.searchsorted(ids, expected)])


def test_duplicates_in_objective_space_are_all_kept():
    costs = np.array([[1.0, 1.0], [2.0, 0.0], [1.0, 1.0], [2.0, 2.0], [0.0, 3.0], [2.0, 0.0]])
    # rows 0 and 2 tie, 1 and 5 tie: none dominates its twin, so all four stay; row 3 is
    # dominated by row 0 (no worse on both, better on both).
    assert pareto_mask(costs).tolist() == [True, True, True, False, True, True]


def test_one_objective_keeps_every_minimum():
    assert pareto_mask(np.array([[3.0], [1.0], [2.0], [1.0]])).tolist() == [False, True, False, True]


def test_nan_rows_never_make_the_front():
    costs = np.array([[np.nan, 0.0], [1.0, 1.0], [0.0, np.inf]])
    assert pareto_mask(costs).tolist() == [False, True, False]


def test_differences_below_rounding_of_the_normalised_sum_still_count():
    # Row 1 beats row 0 by one ulp in column 1; the scaled sums tie in floating point, so the
    # visiting order falls back to lexicographic and must still find that row 0 is dominated.
    one = 1.0
    costs = np.array([[0.0, np.nextafter(one, 2.0), 1e300], [0.0, one, 1e300], [1.0, 0.0, 0.0]])
    assert pareto_mask(costs).tolist() == [False, True, True]
    assert np.array_equal(pareto_mask(costs), dominates_brute(costs))


def test_empty_input():
    assert pareto_mask(np.empty((0, 3))).tolist() == []
    ids, costs = merge_front(np.empty(0, dtype=np.int64), np.empty((0, 2)), np.empty(0, dtype=np.int64), np.empty((0, 2)))
    assert len(ids) == 0 and costs.shape == (0, 2)
