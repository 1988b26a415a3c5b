"""What the dropless layer's step would take if its routed rows cost nothing to move: the
layer beside itself with its three gathers reading from a ready buffer and its two scatters
dropped, and beside a dense FFN of the same active FLOPs. Paired medians over interleaved steps.

    python bench/moe_ceiling.py g-e16k8 --cpu-gemm mkl      # shape names from bench/moe_layer.py
    python bench/moe_ceiling.py --shape 192,64,16,4,8192 --json

Why: issue 13 asks for the dropless layer within 1.15x dense wherever each expert receives at
least 512 rows. Where it misses, the question is whether a fused gather-GEMM-scatter kernel
(native code, reading routed rows inside the product and adding results straight into y) could
close the gap, or whether the products and elementwise work alone already exceed it. This
column is that kernel's best case: everything else (router, sort, products, activations,
allocations, the [T, D] outputs) runs as in the layer. Its outputs are wrong by design; it only
times. The gathers read distinct rows of an [A, D] buffer (from memory, as a fused kernel
would read routed rows), not one hot buffer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
from pathlib import Path

import moespec  # before torch: the OpenMP spin cap moespec runs with
import torch

from moespec.malloc_tuning import keep_freed_memory
from moespec.model import cpu_gemm
from moespec.model import grouped_experts as GX

sys.path.insert(0, str(Path(__file__).parent))
import moe_layer  # noqa: E402  the bench's layer builders
import moe_shapes  # noqa: E402


@contextlib.contextmanager
def without_data_movement(buffers: dict):
    """The kernel's `gather` returns its rows of a ready [A, D] buffer, one for x (read in
    forward and backward; it requires grad) and one for the output gradient (it does not), made
    on first use and kept in `buffers` (pass the same dict each step: the warm-up makes them),
    and `scatter` returns zeros."""
    gather, scatter = GX.gather, GX.scatter
    lock = threading.Lock()  # the thread engine gathers on two threads

    def ready_rows(src_TD, token_A, rows, dtype):
        key = (src_TD.requires_grad, token_A.shape[0], src_TD.shape[1], dtype)
        with lock:
            if key not in buffers:
                buffers[key] = torch.randn(token_A.shape[0], src_TD.shape[1], dtype=dtype)
            return buffers[key][rows]

    GX.gather, GX.scatter = ready_rows, lambda like_TD, token_A, rows_AD: torch.zeros_like(like_TD)
    try:
        yield
    finally:
        GX.gather, GX.scatter = gather, scatter


def measure(shape: dict, steps: int = 12, warmup: int = 2) -> dict:
    (fn, layer), (dense_fn, dense), x, dy = moe_layer.dropless_and_dense(shape)
    runs = {"dense": [], "dropless": [], "no_movement": []}
    buffers: dict = {}
    for step in range(warmup + steps):
        times = {"dropless": moe_layer.time_step(fn, layer, x, dy)}
        with without_data_movement(buffers):
            times["no_movement"] = moe_layer.time_step(fn, layer, x, dy)
        times["dense"] = moe_layer.time_step(dense_fn, dense, x, dy)
        if step >= warmup:
            for name, seconds in times.items():
                runs[name].append(seconds)
    paired = lambda name: statistics.median(a / b for a, b in zip(runs[name], runs["dense"]))  # noqa: E731
    return {
        **shape,
        "rows_per_expert": shape["tokens"] * shape["k"] / shape["E"],
        "steps": steps,
        "median_ms": {name: 1e3 * statistics.median(t) for name, t in runs.items()},
        "dropless_to_dense": paired("dropless"),
        "no_movement_to_dense": paired("no_movement"),
        "step_ms": {name: [round(1e3 * v, 2) for v in t] for name, t in runs.items()},
    }


def render(r: dict) -> str:
    ms = r["median_ms"]
    return (f"{r['name']:<20} {r['rows_per_expert']:>6.0f}  dense {ms['dense']:6.1f} ms  dropless {ms['dropless']:6.1f} ms "
            f"({r['dropless_to_dense']:.2f}x)  without moving rows {ms['no_movement']:6.1f} ms ({r['no_movement_to_dense']:.2f}x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    moe_shapes.add_shape_arguments(parser, steps=12)
    parser.add_argument("--cpu-gemm", choices=cpu_gemm.CHOICES, help="the thread engine's fp32 products (model/cpu_gemm.py)")
    args = parser.parse_args()
    chosen = moe_shapes.chosen_shapes(args, parser)
    keep_freed_memory()
    cpu_gemm.force(args.cpu_gemm)
    results = [measure(shape, steps=args.steps) for shape in chosen]
    head = {"moespec": moespec.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_gemm": cpu_gemm.backend()}
    if args.json:
        print(json.dumps({**head, "shapes": results}, indent=1))
        return
    print(f"moespec {head['moespec']}, torch {head['torch']}, {head['threads']} threads, products on {head['cpu_gemm']}; "
          f"float32, forward + backward; ratios are medians of per-step pairs with dense")  # fmt: skip
    print(f"{'shape':<20} {'rows/E':>6}")
    for result in results:
        print(render(result))


if __name__ == "__main__":
    main()
