"""MoE layer forward + backward time against a dense SwiGLU FFN of the same active FLOPs and
against Hugging Face's `MixtralSparseMoeBlock`, at the same shapes, in one run.

    python bench/moe_layer.py            # a table of milliseconds and ratios to dense
    python bench/moe_layer.py --json     # one JSON document
    python bench/moe_layer.py --ops fine # torch.profiler's top ops, ours_dropless then dense

Columns, per shape (D d_model, F expert d_ff, E experts, K experts per token, T tokens):
- dense: DenseFFN (SwiGLU) of width K*F, the same matmul FLOPs as K routed experts per token;
- ours_dropless: build_moe_layer with a topk router, `dropless: true`;
- ours_capacity: the same with capacity factor 1.0 (fixed [E, C, D] buffers, drops allowed);
- hf_mixtral: transformers' MixtralSparseMoeBlock with its "eager" experts implementation
  (the default for a block built from a MixtralConfig: a Python loop over the experts hit);
- hf_grouped_mm: the same block with `experts_implementation="grouped_mm"` (one
  torch._grouped_mm per projection; FlopCounterMode counts it as zero FLOPs, which is why
  moespec does not use it). Both HF columns are skipped with a note if transformers cannot be
  imported.
Every step is `y = layer(x); y.backward(dy)` with x requiring grad, as inside a model. The
implementations are timed interleaved (one step of each, then again), so machine noise hits
all of them alike; the median over repeats is reported, with its ratio to dense.

Reading the numbers (2-core CPU VM, torch 2.13, when this was written): ours_dropless was 0.94-1.06x
dense on the coarse and medium shapes and 1.1-1.4x on the fine-grained ones. What is left
there, measured: (1) the E*D*F weight gradients are E/K times the dense ones, and at 32 MiB
each glibc hands them out as fresh mmap'd pages every step; on this VM first-touch faults
cost ~0.6 ms/MiB, about 0.1x of dense at E = 64 (raising M_MMAP_THRESHOLD with mallopt
removes it; a GPU caching allocator would too); (2) ~15 ms of per-group op dispatch at E = 64;
(3) a few extra elementwise passes over [A, F] for the gate folded into the activation.
Other processes on the machine hurt code with many small parallel ops (ours, HF) far more
than dense's few big matmuls: a run under load can show 2-4x for every MoE column. Compare
ratios only from runs with a low `load_avg_1min`, or use --threads 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from moespec.model.layers import DenseFFN
from moespec.model.moe_layer import build_moe_layer
from moespec.spec.plan import CapacityPlan, ExpertsPlan, MoELayerPlan, TopKRouter

# From coarse-grained (Mixtral-like: few wide experts) to fine-grained (DeepSeek-like).
SHAPES = [
    {"name": "coarse", "d": 512, "f": 1024, "E": 8, "k": 2, "tokens": 4096},
    {"name": "medium", "d": 512, "f": 512, "E": 16, "k": 4, "tokens": 4096},
    {"name": "fine-32", "d": 512, "f": 256, "E": 32, "k": 8, "tokens": 2048},
    {"name": "fine", "d": 512, "f": 256, "E": 64, "k": 8, "tokens": 2048},
]


def ours(shape: dict, *, dropless: bool):
    capacity = CapacityPlan(
        factor=None if dropless else 1.0,
        eval_factor=None if dropless else 1.0,
        min_capacity=4,
        drop_policy="position",
        dropless=dropless,
    )
    plan = MoELayerPlan(
        router=TopKRouter(k=shape["k"]),
        experts=ExpertsPlan(count=shape["E"], d_ff=shape["f"], shared_count=0, shared_d_ff=0, shared_gate=False),
        capacity=capacity,
    )
    layer = build_moe_layer(plan, d_model=shape["d"], activation="swiglu", layer_index=0)
    return lambda x: layer(x)[0], layer


def dense(shape: dict):
    ffn = DenseFFN(d_model=shape["d"], d_ff=shape["k"] * shape["f"], activation="swiglu")
    return ffn, ffn


def hf_mixtral(shape: dict, implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=shape["d"],
        intermediate_size=shape["f"],
        num_local_experts=shape["E"],
        num_experts_per_tok=shape["k"],
        router_jitter_noise=0.0,
        experts_implementation=implementation,
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.02)

    def run(x_TD):
        out = block(x_TD[None])  # [1, T, D]
        out = out[0] if isinstance(out, tuple) else out
        return out[0]

    return run, block


def time_step(fn, module, x, dy) -> float:
    x.grad = None
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    fn(x).backward(dy)
    return time.perf_counter() - start


def bench_shape(shape: dict, *, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    impls = {"dense": dense(shape), "ours_dropless": ours(shape, dropless=True), "ours_capacity": ours(shape, dropless=False)}
    notes = []
    try:
        impls["hf_mixtral"] = hf_mixtral(shape, "eager")
        impls["hf_grouped_mm"] = hf_mixtral(shape, "grouped_mm")
    except ImportError as err:
        notes.append(f"hf_mixtral skipped: transformers not importable ({err})")
    x = torch.randn(shape["tokens"], shape["d"], requires_grad=True)
    dy = torch.randn(shape["tokens"], shape["d"])
    times = {name: [] for name in impls}
    for rep in range(warmup + repeats):
        for name, (fn, module) in impls.items():
            elapsed = time_step(fn, module, x, dy)
            if rep >= warmup:
                times[name].append(elapsed)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {
        **shape,
        "median_ms": ms,
        "ratio_to_dense": {name: ms[name] / ms["dense"] for name in ms},
        "notes": notes,
    }


def op_table(shape: dict, *, steps: int = 3) -> str:
    """Where the time goes: torch.profiler's self-CPU table for ours_dropless, then dense, over
    `steps` forward+backward steps each (after 3 unprofiled ones), so the gap can be read per op."""
    from torch.profiler import profile

    torch.manual_seed(0)
    x = torch.randn(shape["tokens"], shape["d"], requires_grad=True)
    dy = torch.randn(shape["tokens"], shape["d"])
    tables = []
    for name, (fn, module) in {"ours_dropless": ours(shape, dropless=True), "dense": dense(shape)}.items():
        for _ in range(3):
            time_step(fn, module, x, dy)
        with profile() as prof:
            for _ in range(steps):
                time_step(fn, module, x, dy)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        tables.append(f"{name} ({shape['name']}, {steps} steps)\n{table}")
    return "\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shapes", nargs="*", help="names from the panel (default: all)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--ops", metavar="SHAPE", help="instead of the table: torch.profiler's top ops of ours_dropless and dense")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ops:
        print(op_table(next(s for s in SHAPES if s["name"] == args.ops)))
        return
    load_before = os.getloadavg()
    shapes = [s for s in SHAPES if not args.shapes or s["name"] in args.shapes]
    results = [bench_shape(s, repeats=args.repeats, warmup=args.warmup) for s in shapes]
    doc = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "repeats": args.repeats,
        "step": "forward + backward, x requires grad, float32",
        # Other processes on the machine inflate many-small-op code (ours, HF) more than one
        # big matmul (dense): record the 1-minute load average around the run.
        "load_avg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "shapes": results,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"torch {doc['torch']}, {doc['threads']} threads; {doc['step']}; median of {args.repeats}; "
          f"load average {doc['load_avg_1min'][0]} -> {doc['load_avg_1min'][1]}")
    names = list(results[0]["median_ms"])
    print(f"{'shape':<8} {'D':>4} {'F':>5} {'E':>3} {'K':>2} {'T':>5}  " + "  ".join(f"{n:>22}" for n in names))
    for r in results:
        cells = [f"{r['median_ms'][n]:9.1f} ms ({r['ratio_to_dense'][n]:4.2f}x)" for n in names]
        print(f"{r['name']:<8} {r['d']:>4} {r['f']:>5} {r['E']:>3} {r['k']:>2} {r['tokens']:>5}  " + "  ".join(f"{c:>22}" for c in cells))
        for note in r["notes"]:
            print("   note:", note)


if __name__ == "__main__":
    main()
