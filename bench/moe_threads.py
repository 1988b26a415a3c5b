"""Where the dropless layer's step goes on the thread engine, thread by thread: the time each
thread spends in its groups' pipelines (forward, backward) and in their products, the
products' FLOP rate, and what is left outside the groups (router, sort and plan, the two
scatters, autograd), beside a dense FFN of the same active FLOPs and its nine products timed
alone. Medians over interleaved steps.

    python bench/moe_threads.py g-e16k8 issue-2          # shape names from bench/moe_layer.py
    python bench/moe_threads.py --shape 256,128,16,8,8192 --json

Why: torch.profiler sees only the main thread's ops (the worker runs half the groups), and a
whole-layer ratio does not say whether the products or the data movement around them is
slow. Timing is a `time.perf_counter` pair around each group's `_forward_slab` and
`_backward_slab` and around each product of a per-group slab (`Slab.times`, `add_times`,
`weight_grad`), so the counted product FLOPs are the kernel's own: 18 * A * D * F a step
for a gated expert (tests/test_bench_scripts.py holds them to that). The README's "floor" of
this design at g-e16k8 (Benchmarks, moe_layer) comes from these figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import moespec  # before torch: the OpenMP spin cap moespec runs with
import torch

from moespec.malloc_tuning import keep_freed_memory
from moespec.model import grouped_experts as GX

sys.path.insert(0, str(Path(__file__).parent))
import moe_layer  # noqa: E402  the bench's shapes and layer builders
import moe_shapes  # noqa: E402
import moe_stages  # noqa: E402  the dense FFN's product forms


class _Clock:
    """Seconds and product FLOPs per (thread, label), from wrapped kernel functions."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seconds = defaultdict(float)
        self.flops = defaultdict(int)

    def add(self, label: str, seconds: float, flops: int = 0) -> None:
        key = (threading.current_thread().name, label)
        with self.lock:
            self.seconds[key] += seconds
            self.flops[key] += flops

    def clear(self) -> None:
        self.seconds.clear()
        self.flops.clear()


def _timed(clock: _Clock, label: str, fn, flops):
    def run(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        clock.add(label, time.perf_counter() - start, flops(*args))
        return out

    return run


def instrument(clock: _Clock):
    """Wrap the kernel's per-group pipeline and products; returns a function that unwraps."""
    saved = {name: getattr(GX, name) for name in ("_forward_slab", "_backward_slab")}
    methods = {name: getattr(GX.Slab, name) for name in ("times", "add_times", "weight_grad")}

    def flops(s, a_NK, n_cols: int) -> int:  # a per-group slab's product; the all-groups slab is not the thread engine
        return 2 * a_NK.shape[0] * a_NK.shape[1] * n_cols if s.per_group else 0

    GX._forward_slab = _timed(clock, "forward", saved["_forward_slab"], lambda *args: 0)
    GX._backward_slab = _timed(clock, "backward", saved["_backward_slab"], lambda *args: 0)
    GX.Slab.times = _timed(clock, "products", methods["times"], lambda s, a, w, out=None: flops(s, a, w.shape[2]))
    GX.Slab.add_times = _timed(clock, "products", methods["add_times"], lambda s, into, a, w: flops(s, a, w.shape[2]))
    GX.Slab.weight_grad = _timed(clock, "products", methods["weight_grad"], lambda s, a, g, *rest: flops(s, a, g.shape[1]))

    def undo() -> None:
        for name, fn in saved.items():
            setattr(GX, name, fn)
        for name, fn in methods.items():
            setattr(GX.Slab, name, fn)

    return undo


def measure(shape: dict, steps: int = 7, warmup: int = 2) -> dict:
    (fn, layer), (dense_fn, dense), x, dy = moe_layer.dropless_and_dense(shape)
    clock = _Clock()
    undo = instrument(clock)
    runs = []
    try:
        for step in range(warmup + steps):
            clock.clear()
            dropless_s = moe_layer.time_step(fn, layer, x, dy)
            by_thread = defaultdict(dict)
            for (thread, label), seconds in clock.seconds.items():
                by_thread[thread][label] = seconds
                if label == "products":
                    by_thread[thread]["flops"] = clock.flops[(thread, label)]
            dense_s = moe_layer.time_step(dense_fn, dense, x, dy)
            with torch.no_grad():  # the nine products: each of the three forms three times
                products_s = sum(sum(moe_stages.dense_products(shape)) for _ in range(3)) / 1e3
            if step >= warmup:
                runs.append({"dropless": dropless_s, "dense": dense_s, "dense_products": products_s, "threads": dict(by_thread)})
    finally:
        undo()
    return summarize(shape, runs)


def summarize(shape: dict, runs: list[dict]) -> dict:
    med = lambda values: statistics.median(values)  # noqa: E731
    threads = sorted({name for run in runs for name in run["threads"]})
    per_thread = {}
    for name in threads:
        rows = [run["threads"].get(name, {}) for run in runs]
        forward, backward = med([r.get("forward", 0.0) for r in rows]), med([r.get("backward", 0.0) for r in rows])
        products, flops = med([r.get("products", 0.0) for r in rows]), med([r.get("flops", 0) for r in rows])
        per_thread[name] = {"forward_ms": 1e3 * forward, "backward_ms": 1e3 * backward, "products_ms": 1e3 * products,
                            "product_gflops": flops / 1e9, "gflop_per_s": flops / products / 1e9 if products else 0.0}  # fmt: skip
    dropless, dense, products = med([r["dropless"] for r in runs]), med([r["dense"] for r in runs]), med([r["dense_products"] for r in runs])
    busiest = max((t["forward_ms"] + t["backward_ms"] for t in per_thread.values()), default=0.0)
    dense_flops = 18 * shape["tokens"] * shape["d"] * shape["k"] * shape["f"]
    return {
        **shape,
        "steps": len(runs),
        "dropless_ms": 1e3 * dropless,
        "dense_ms": 1e3 * dense,
        "dense_products_ms": 1e3 * products,
        "dense_gflop_per_s_per_thread": dense_flops / products / 1e9 / torch.get_num_threads(),
        "threads": per_thread,
        "outside_groups_ms": 1e3 * dropless - busiest,
    }


def render(r: dict) -> str:
    lines = [f"{r['name']} (D {r['d']}, F {r['f']}, E {r['E']}, k {r['k']}, T {r['tokens']}): median of {r['steps']} steps",
             f"  dense:    step {r['dense_ms']:.1f} ms; its 9 products alone {r['dense_products_ms']:.1f} ms, "
             f"{r['dense_gflop_per_s_per_thread']:.0f} GF/s per thread",
             f"  dropless: step {r['dropless_ms']:.1f} ms ({r['dropless_ms'] / r['dense_ms']:.2f}x dense)"]  # fmt: skip
    for name, t in r["threads"].items():
        lines.append(f"    {name:<18} groups {t['forward_ms'] + t['backward_ms']:6.1f} ms (forward {t['forward_ms']:.1f}, "
                     f"backward {t['backward_ms']:.1f}); products {t['products_ms']:.1f} ms, {t['product_gflops']:.2f} GFLOP, "
                     f"{t['gflop_per_s']:.0f} GF/s")  # fmt: skip
    lines.append(f"    outside the groups (step - busiest thread's groups): {r['outside_groups_ms']:.1f} ms")
    if len(r["threads"]) < 2:
        lines.append("    (one thread: the all-groups path ran, not the thread engine)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    moe_shapes.add_shape_arguments(parser, steps=7)
    args = parser.parse_args()
    chosen = moe_shapes.chosen_shapes(args, parser)
    keep_freed_memory()
    results = [measure(shape, steps=args.steps) for shape in chosen]
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "shapes": results}, indent=1))
        return
    print(f"moespec {moespec.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; float32, forward + backward")
    for result in results:
        print(render(result))


if __name__ == "__main__":
    main()
