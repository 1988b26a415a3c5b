"""Benchmark: designs evaluated per second by the vectorised simulator (moespec.sim.cost.evaluate).

An OLMoE-1B-7B base (specs/olmoe-1b-7b.yaml) swept at random over experts E, top-k, capacity
factor (or dropless), ep, dp, micro-batch and ZeRO stage on the 4 x 8 H100 cluster; ep always
divides dp, so every design is valid. The designs are built as
arrays (no SpecPlan per design) and evaluated in chunks with one CollectiveCosts table, as the
explorer does; building the arrays is not timed, evaluating them is, best of `--repeats`: on
one thread (the target's figure), and as the explorer runs them, chunks on every CPU
(`explore.run.ordered_map`; numpy releases the GIL in its array operations).

    python bench/sim_speed.py [--designs 1000000 --chunk 100000 --repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from moespec.sim.backend import load_backend
from moespec.sim.cost import CollectiveCosts, evaluate
from moespec.explore.run import default_threads, ordered_map
from moespec.sim.design import DesignBatch
from moespec.spec import load_plan

ROOT = Path(__file__).resolve().parents[1]
TARGET_PER_S = 1_000_000  # issue 11: keep the one cost model at >= 1M designs/s


def random_sweep(count: int, seed: int) -> DesignBatch:
    rng = np.random.default_rng(seed)
    dp = rng.choice([1, 2, 4, 8, 16, 32], count)
    ep = np.minimum(rng.choice([1, 2, 4, 8, 16, 32], count), dp)  # powers of two: ep | dp
    factor = rng.choice([1.0, 1.25, 1.5, 2.0, 0.0], count)  # 0.0: dropless
    base = load_plan(ROOT / "specs/olmoe-1b-7b.yaml")
    return DesignBatch.sweep(
        base, experts=rng.choice([8, 16, 32, 64, 128, 256], count), k=rng.choice([1, 2, 4, 8], count),
        capacity_factor=factor, dropless=factor == 0.0, min_capacity=4, dp=dp, ep=ep,
        micro_batch=rng.choice([1, 2, 4, 8], count), global_batch=1024, zero_stage=rng.integers(0, 4, count),
    )  # fmt: skip


def run(designs: int, chunk: int, repeats: int, seed: int, backend_name: str) -> dict:
    backend = load_backend(backend_name)
    batch = random_sweep(designs, seed)
    costs = CollectiveCosts(backend)
    chunks = [batch.take(slice(start, start + chunk)) for start in range(0, designs, chunk)]
    evaluate(chunks[0].take(slice(0, 16)), backend, collectives=costs)  # warm-up: fill the cost table
    times_s, threaded_s = [], []
    workers = default_threads()
    for _ in range(repeats):  # one thread, then the explorer's way (chunks on every CPU), interleaved
        start = time.perf_counter()
        results = [evaluate(part, backend, collectives=costs) for part in chunks]
        times_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        list(ordered_map(lambda part: evaluate(part, backend, collectives=costs), chunks, workers=workers))
        threaded_s.append(time.perf_counter() - start)
    fits = sum(int(r["fits"].sum()) for r in results)
    best = max(float(np.nanmax(r["tokens_per_s"])) for r in results)
    per_s = designs / min(times_s)
    threaded = designs / min(threaded_s)
    return {
        "designs": designs, "chunk": chunk, "backend": backend.name, "times_s": times_s,
        "designs_per_s": per_s, "target_per_s": TARGET_PER_S, "meets_target": per_s >= TARGET_PER_S,
        "threads": workers, "threaded_times_s": threaded_s, "threaded_designs_per_s": threaded,
        "fitting_designs": fits, "best_tokens_per_s": best,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="h100-cluster-4n")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    result = run(args.designs, args.chunk, args.repeats, args.seed, args.backend)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['designs']:,} designs on {result['backend']} in chunks of {result['chunk']:,}: "
              f"best {min(result['times_s']):.3f} s -> {result['designs_per_s']:,.0f} designs/s "
              f"(target {TARGET_PER_S:,}: {'met' if result['meets_target'] else 'MISSED'}); "
              f"{result['fitting_designs']:,} fit in memory")  # fmt: skip
        print(f"the explorer's way, chunks on {result['threads']} threads: best {min(result['threaded_times_s']):.3f} s -> "
              f"{result['threaded_designs_per_s']:,.0f} designs/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
