"""How good is the searched front? On spaces small enough to enumerate, the exact Pareto front
(`explore`, every design) beside the front `search` returns from 1% of the designs, by
hypervolume (HV) ratio, for three seeds.

    .venv/bin/python bench/explore_search.py [--share 0.01] [--seeds 0 1 2] [SWEEP ...]

HV: each objective scaled to [0, 1] by the exact front's range (maximised ones negated), the
reference point 1.1 in every dimension, the volume from moocore (pymoo's dependency). A searched
design outside the exact front's box is clipped to the reference (it cannot add volume the
exact front lacks: every feasible design is in the exhaustive run). Target (issue 17): HV ratio
>= 0.99 with <= 1% of the designs evaluated, on three spaces of 10^6-10^7 designs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from moespec.explore import explore, load_sweep, to_costs
from moespec.explore.search import search

ROOT = Path(__file__).resolve().parents[1]
SPACES = [ROOT / "specs/sweeps/h100-million.yaml", ROOT / "bench/search_spaces/mixtral-2obj.yaml", ROOT / "bench/search_spaces/deepseek-3obj.yaml"]


def front_costs(result) -> np.ndarray:
    sweep = result.sweep
    values = np.column_stack([result.front.figures[o.name] for o in sweep.objectives])
    return to_costs(values, np.array([o.direction == "max" for o in sweep.objectives]))


def hypervolume(costs: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    import moocore

    scaled = (costs - low) / np.where(high > low, high - low, 1.0)
    return float(moocore.hypervolume(np.minimum(scaled, 1.1), ref=np.full(costs.shape[1], 1.1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="*", type=Path, default=SPACES)
    parser.add_argument("--share", type=float, default=0.01, help="budget as a share of the space (default 1%%)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print(f"{'space':<16} {'designs':>11} {'obj':>3} {'exact front':>11} {'exhaustive':>10}   {'seed':>4} {'budget':>8} "
          f"{'distinct':>8} {'share':>6} {'front':>6} {'HV ratio':>8} {'search':>7}")
    for path in args.sweeps:
        sweep = load_sweep(path)
        started = time.perf_counter()
        exact = explore(sweep)
        exhaustive_s = time.perf_counter() - started
        costs = front_costs(exact)
        low, high = costs.min(axis=0), costs.max(axis=0)
        exact_hv = hypervolume(costs, low, high)
        budget = max(1, int(exact.designs * args.share))
        for seed in args.seeds:
            started = time.perf_counter()
            found = search(sweep, budget=budget, seed=seed)
            search_s = time.perf_counter() - started
            ratio = hypervolume(front_costs(found), low, high) / exact_hv
            info = found.search
            print(f"{sweep.name:<16} {exact.designs:>11,} {len(sweep.objectives):>3} {len(exact.front):>11,} {exhaustive_s:>9.1f}s   "
                  f"{seed:>4} {budget:>8,} {info['distinct']:>8,} {info['distinct'] / exact.designs:>6.2%} {len(found.front):>6,} "
                  f"{ratio:>8.4f} {search_s:>6.1f}s")


if __name__ == "__main__":
    main()
