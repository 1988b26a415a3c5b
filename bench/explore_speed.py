"""Designs per second, end to end, of `moespec.explore.explore` (target: >= 100,000/s).

End to end means what `moespec explore` does after parsing its arguments: load and check the
sweep (base spec and backend included), resolve the structural combinations, generate every
design, check the spec rules, simulate, fold into the Pareto front / sample, and re-evaluate
the front for the report. Run: `python bench/explore_speed.py` (best of --repeat runs).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

from moespec.explore import explore, load_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "specs" / "sweeps"
TARGET_PER_S = 100_000


def measure(path: Path, repeat: int) -> tuple[float, int, int, int]:
    """(best wall seconds of `repeat` runs, designs, front size, peak traced MiB of one more run)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = explore(load_sweep(path))
        times.append(time.perf_counter() - start)
    tracemalloc.start()  # slows numpy a little, so it gets a run of its own
    explore(load_sweep(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return min(times), result.designs, len(result.front), peak // 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for name in ("h100-32-experts", "h100-million"):
        seconds, designs, front, peak_mib = measure(SWEEPS / f"{name}.yaml", max(args.repeat, 1))
        print(f"{name}: {designs:,} designs in {seconds:.2f} s, front {front}, peak traced memory {peak_mib} MiB")
        rate = designs / seconds
        if designs >= 1_000_000:  # the target is throughput; a small space mostly pays fixed setup
            verdict = "ok" if rate >= TARGET_PER_S else f"BELOW the {TARGET_PER_S:,}/s target"
            print(f"{name}: {rate:,.0f} designs/s end to end ({verdict})")
        else:
            print(f"{name}: {rate:,.0f} designs/s end to end (small space: one-off setup, mostly collective fits on the topology)")


if __name__ == "__main__":
    main()
