"""MoE layer forward + backward time against a dense SwiGLU FFN of the same active FLOPs and
against Hugging Face's `MixtralSparseMoeBlock`, at the same shapes, in one run.

    python bench/moe_layer.py                     # the tuned shapes: ms and ratios to dense
    python bench/moe_layer.py --set grid --routers --busy --no-peers
    python bench/moe_layer.py --json              # one JSON document
    python bench/moe_layer.py --ops fine          # torch.profiler's top ops, ours_dropless then dense

Sets: `tuned` (the four shapes the kernel was tuned on and the three of issue 13), `grid`
(eight shapes chosen before any measurement: E 8-128, k 1-8, T 2048 and 8192, d_model
256-1024, coarse and fine d_ff; the thread engine and BASE's batched groups were built
looking at some of them), `fresh` (five shapes chosen after that code was final, E 12-256,
k 1-8), `unseen` (five shapes chosen after the process tuning of 2026-11-30, E 6-160, k
1-8), `all`. The bundles' grouped GEMMs (2026-12-02) were chosen on issue-2, f-e256k8 and
u-e160k4 (model/grouped_experts.py); oneDNN's call sizes (model/cpu_gemm.py CHUNKS, the same
day) on g-e16k8, u-e24k8, fine-32, g-e16k2, issue-3 and coarse. `--engines` adds our dropless layer on `torch._grouped_mm` (dropless_grouped_mm)
beside the thread engine, same weights and routing; `--gemm-ab` adds it with its products on
MKL (dropless_mkl) beside the library this process chose (model/cpu_gemm.py); `--chunks-ab`
with oneDNN called 256 rows at a time (dropless_chunks256), as before its calls grew to 1024;
`--gate-up-ab` with its gate and up products apart at every d_ff (dropless_gate_up_apart; the
thread engine stacks them at d_ff <= 96 on oneDNN, model/grouped_experts.py GATE_UP, chosen on
d192 f64, d256 f64/f96/f128, d512 f128, d384 f192 and f-e7k2, none of the sets' shapes).
Columns, per shape (D d_model, F expert d_ff, E experts, K experts per token, T tokens):
- dense: DenseFFN (SwiGLU) of width K*F, the same matmul FLOPs as K routed experts per token;
- ours_dropless: build_moe_layer with a topk router, `dropless: true` (with two or more
  threads each group's whole pipeline on one thread, then one scatter; on one thread one
  gather, one `torch._grouped_mm` per projection, one scatter);
- ours_capacity: the same with capacity factor 1.0 (fixed [E, C, D] buffers, drops allowed);
- with --routers, at k = 1: ours_base (BASE: the auction, then the dropless kernel on exactly
  T/E rows per expert: one bmm per projection) and ours_switch (Switch top-1, capacity 1.0);
- hf_mixtral / hf_grouped_mm: transformers' MixtralSparseMoeBlock with its "eager" experts
  (a Python loop over the experts hit) and with `experts_implementation="grouped_mm"`;
  skipped with a note if transformers cannot be imported (or --no-peers).
Every step is `y = layer(x); y.backward(dy)` with x requiring grad, as inside a model. The
implementations are timed interleaved (one step of each, then again), so machine noise hits
all of them alike; the median over repeats is reported, with its ratio to dense. The run
ends with the worst ratios (dropless / capacity; dropless / dense where each expert gets at
least 512 rows; dropless / HF grouped_mm; BASE / Switch) and where they are, each also as the
median of per-repeat ratios ("paired by repeat": the two steps of a pair run back to back, so
a slow stretch of the machine hits both; `--json` keeps every step in `step_ms`). Each of
these ratios is then re-measured alone at its worst paired shape with `--confirm` fresh pairs
(20 by default): picked as the worst of up to 28 noisy ratios, its first figure is biased
upward.
`--busy` runs the set again beside a process that keeps one core busy and prints each path's
slowdown (busy / quiet) and the worst dropless-to-capacity slowdown ratio.
The process is tuned as `moespec train` and `profile` tune theirs, for every column alike:
OpenMP's idle threads spin 10,000 loops, not libgomp's ~5-10 ms (moespec/openmp_tuning.py),
and malloc keeps freed memory (moespec/malloc_tuning.py). `--untuned` runs with neither, to
see what they change.

Reading the numbers: on this 2-core VM one run's ratios move by 10-20% between runs (compare
paths within a run, never across runs). With two or more threads the dropless kernel runs each
group's whole pipeline on one thread, groups handed out as threads come free
(model/grouped_experts.py, model/group_threads.py):
torch._grouped_mm on CPU is one mm per group split over both threads, a barrier per group,
which a busy core turns into a stall per group (its layer slowed 2.5-4.4x beside a busy core
where the capacity path's bmm slowed 2x). Quiet, the thread engine was 0.88-0.95x the
`_grouped_mm` path's time (`--engines`, 2026-12-01, fine, issue-2, g-e16k8, f-e7k2);
BASE's equal groups run one bmm. On GPUs grouped GEMMs are one kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import moespec  # before torch: caps OpenMP's idle spin as in every moespec process (moespec/openmp_tuning.py)
import torch

from moespec.malloc_tuning import keep_freed_memory
from moespec.model import cpu_gemm, group_threads
from moespec.model.layers import DenseFFN
from moespec.model.moe_layer import build_moe_layer
from moespec.spec.plan import BaseRouter, CapacityPlan, ExpertsPlan, MoELayerPlan, SwitchRouter, TopKRouter
from moe_report import TARGETS, confirm_line, render, worst, worst_paired  # noqa: F401  the run's report (bench/ is on sys.path)
from moe_shapes import ALL, FRESH, GRID, SHAPES, UNSEEN, parse_shape  # noqa: F401  the named shapes (other benches read them here)
from moe_variants import AB, on_chunks, on_grouped_mm, on_mkl, under  # noqa: F401  the layer with one knob turned (tests read them here)


def ours(shape: dict, *, dropless: bool, router=None):
    """Our MoE layer at `shape`: top-k (or `router`: Switch, BASE with k = 1) with the
    dropless path or capacity factor 1.0."""
    capacity = CapacityPlan(
        factor=None if dropless else 1.0,
        eval_factor=None if dropless else 1.0,
        min_capacity=4,
        drop_policy="position",
        dropless=dropless,
    )
    plan = MoELayerPlan(
        router=router or TopKRouter(k=shape["k"]),
        experts=ExpertsPlan(count=shape["E"], d_ff=shape["f"], shared_count=0, shared_d_ff=0, shared_gate=False),
        capacity=capacity,
    )
    layer = build_moe_layer(plan, d_model=shape["d"], activation="swiglu", layer_index=0)
    return lambda x: layer(x)[0], layer


def dense(shape: dict):
    ffn = DenseFFN(d_model=shape["d"], d_ff=shape["k"] * shape["f"], activation="swiglu")
    return ffn, ffn


def dropless_and_dense(shape: dict):
    """(dropless layer, dense FFN, x, dy) from seed 0: the pair the moe_threads and moe_ceiling
    benches time, each as (step function, module)."""
    torch.manual_seed(0)
    pair = ours(shape, dropless=True), dense(shape)
    return (*pair, torch.randn(shape["tokens"], shape["d"], requires_grad=True), torch.randn(shape["tokens"], shape["d"]))


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


def layer_options(args) -> dict:
    """The `layers` keywords a run's flags ask for."""
    return {"routers": args.routers, "peers": not args.no_peers, "engines": args.engines, "gemm_ab": args.gemm_ab,
            "ab": [flag for flag in AB if getattr(args, flag, False)]}  # fmt: skip


def layers(shape: dict, *, routers: bool = False, peers: bool = True, engines: bool = False, gemm_ab: bool = False, ab: tuple = ()):
    """(impls, notes, x, dy) of one shape, every layer from seed 0 in the same order, so a
    second build (`confirm`) has the same weights, routing and input as the first."""
    torch.manual_seed(0)
    impls = {"dense": dense(shape), "ours_dropless": ours(shape, dropless=True), "ours_capacity": ours(shape, dropless=False)}
    if engines:  # the same weights and routing on _grouped_mm: the thread engine against it
        impls["dropless_grouped_mm"] = on_grouped_mm(impls["ours_dropless"])
    if gemm_ab:  # the same weights and routing, products on MKL: what the oneDNN choice buys
        impls["dropless_mkl"] = on_mkl(impls["ours_dropless"])
    for flag in ab:  # the same weights and routing, one knob changed (AB)
        impls[AB[flag][0]] = under(impls["ours_dropless"], AB[flag][1])
    if routers:  # BASE (balanced assignment, every expert T/E rows: the dropless kernel) and Switch (top-1, capacity 1.0)
        top1 = dict(shape, k=1)
        impls["ours_base"] = ours(top1, dropless=True, router=BaseRouter(shuffle=False))
        impls["ours_switch"] = ours(top1, dropless=False, router=SwitchRouter())
    notes = []
    try:
        if not peers:
            raise ImportError("--no-peers")
        impls["hf_mixtral"] = hf_mixtral(shape, "eager")
        impls["hf_grouped_mm"] = hf_mixtral(shape, "grouped_mm")
    except ImportError as err:
        notes.append(f"hf_mixtral skipped: transformers not importable ({err})")
    x = torch.randn(shape["tokens"], shape["d"], requires_grad=True)
    dy = torch.randn(shape["tokens"], shape["d"])
    return impls, notes, x, dy


def bench_shape(shape: dict, *, repeats: int, warmup: int, **options) -> dict:
    """One shape's layers (`layers(shape, **options)`) timed interleaved."""
    impls, notes, x, dy = layers(shape, **options)
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
        "step_ms": {name: [round(1e3 * v, 2) for v in t] for name, t in times.items()},  # per repeat, in run order
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


def competitor() -> subprocess.Popen:
    """A process that keeps one core busy (pure Python arithmetic), as a second job on a
    laptop, a CI runner or a shared node does."""
    return subprocess.Popen([sys.executable, "-c", "x = 0\nwhile True:\n    x = (x + 1) % 1000003"])


def run_set(shapes: list[dict], args) -> list[dict]:
    return [bench_shape(s, repeats=args.repeats, warmup=args.warmup, **layer_options(args)) for s in shapes]


def confirm(results: list[dict], args) -> list[dict] | None:
    """For each target ratio of the run, fresh steps of its two layers alone at the shape
    whose paired ratio was the worst, `args.confirm` pairs, back to back, which goes first
    alternating. Why: the worst of many noisy ratios is biased upward (the shape is picked by
    the same samples that measure it, the winner's curse); new samples measure the picked
    shape without that bias. A shape that is the worst of several targets is built once."""
    if not args.confirm:
        return None
    picked = [(label, num, den, found[1]) for label, num, den, where in TARGETS if (found := worst_paired(results, num, den, where))]
    checked = []
    for name in dict.fromkeys(shape for *_, shape in picked):  # each shape once, in the targets' order
        shape = next({k: r[k] for k in ("name", "d", "f", "E", "k", "tokens")} for r in results if r["name"] == name)
        impls, _, x, dy = layers(shape, **layer_options(args))
        for label, num, den, _ in (p for p in picked if p[3] == name):
            steps = {num: [], den: []}
            for rep in range(args.warmup + args.confirm):
                for impl in list(steps)[:: 1 if rep % 2 == 0 else -1]:
                    elapsed = time_step(*impls[impl], x, dy)
                    if rep >= args.warmup:
                        steps[impl].append(round(1e3 * elapsed, 2))
            checked.append({"label": label, "name": name, "step_ms": steps})
    order = [label for label, *_ in TARGETS]
    return sorted(checked, key=lambda c: order.index(c["label"])) or None


def ops_shape(text: str, parser: argparse.ArgumentParser) -> dict:
    """`--ops`'s shape: a named one, else D,F,E,K,T; anything else is a one-line usage error."""
    named = [s for s in ALL if s["name"] == text]
    if named:
        return named[0]
    try:
        return parse_shape(text)
    except argparse.ArgumentTypeError as error:
        parser.error(f"--ops: not a shape name ({', '.join(s['name'] for s in ALL)}) and {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", choices=("tuned", "grid", "fresh", "unseen", "all"), default="tuned",
                        help="tuned: the shapes the kernel was tuned on; grid: chosen before measuring; fresh, unseen: chosen after the code was final")
    parser.add_argument("--engines", action="store_true", help="add our dropless layer on torch._grouped_mm beside the thread engine")
    parser.add_argument("--shapes", nargs="*", help="names from the chosen set (default: all of it)")
    parser.add_argument("--shape", action="append", type=parse_shape, metavar="D,F,E,K,T",
                        help="your own shape (d_model, expert d_ff, experts, k, tokens) instead of a set; repeatable")
    parser.add_argument("--routers", action="store_true", help="add BASE and Switch layers (k = 1) at each shape")
    parser.add_argument("--confirm", type=int, default=20, metavar="N",
                        help="re-measure each target ratio at its worst shape with N fresh paired repeats (0: not)")
    parser.add_argument("--busy", action="store_true", help="run the set again beside a process that keeps one core busy; print slowdowns")
    parser.add_argument("--no-peers", action="store_true", help="skip Hugging Face's blocks")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--cpu-gemm", choices=("auto", "mkl", "onednn"),
                        help="the thread engine's fp32 products: MKL or oneDNN (default: MOESPEC_CPU_GEMM, else auto; model/cpu_gemm.py)")
    parser.add_argument("--gemm-ab", action="store_true",
                        help="add our dropless layer with its products on MKL (dropless_mkl) beside the chosen library, same weights and routing")
    parser.add_argument("--chunks-ab", action="store_true",
                        help="add our dropless layer with oneDNN called 256 rows at a time (dropless_chunks256, the sizes before 2026-12-02), same weights and routing")
    parser.add_argument("--gate-up-ab", action="store_true",
                        help="add our dropless layer with its gate and up products apart at every d_ff (dropless_gate_up_apart; model/grouped_experts.py GATE_UP)")
    parser.add_argument("--bundle-rows", type=int, metavar="N",
                        help="the thread engine's bundles of small groups: at most N rows (0: none; default 512, model/group_threads.py)")
    parser.add_argument("--ops", metavar="SHAPE", help="instead of the table: torch.profiler's top ops of ours_dropless and dense at a named shape or D,F,E,K,T")
    parser.add_argument("--show", metavar="FILE", help="print the tables of a saved --json run instead of running")
    parser.add_argument("--untuned", action="store_true", help="libgomp's default spin and glibc's default malloc (not what moespec runs with)")
    args = parser.parse_args()
    if args.untuned and os.environ.get("MOESPEC_BENCH_UNTUNED") != "1":  # the spin is read when torch loads: start again
        env = dict(os.environ, GOMP_SPINCOUNT="300000", MOESPEC_BENCH_UNTUNED="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.show:
        print(render(json.loads(open(args.show).read())))
        return
    tuning = {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "libgomp default"),
              "malloc_keeps_freed_memory": not args.untuned and keep_freed_memory()}  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_gemm.force(args.cpu_gemm)  # None: the environment's choice
    if args.bundle_rows is not None:
        group_threads.BUNDLE["rows"] = args.bundle_rows
    panel = {"tuned": SHAPES, "grid": GRID, "fresh": FRESH, "unseen": UNSEEN, "all": ALL}[args.set]
    if args.ops:
        print(op_table(ops_shape(args.ops, parser)))
        return
    load_before = os.getloadavg()
    shapes = args.shape or [s for s in panel if not args.shapes or s["name"] in args.shapes]
    results = run_set(shapes, args)
    checked = confirm(results, args)
    busy = None
    if args.busy:
        process = competitor()
        try:
            time.sleep(1.0)
            busy = run_set(shapes, args)
        finally:
            process.kill()
            process.wait()
    doc = {
        "torch": torch.__version__,
        "moespec": moespec.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "repeats": args.repeats,
        "step": "forward + backward, x requires grad, float32",
        # Other processes on the machine inflate many-small-op code (ours, HF) more than one
        # big matmul (dense): record the 1-minute load average around the run.
        "load_avg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "process_tuning": tuning,
        "cpu_gemm": cpu_gemm.backend(),
        "bundle_rows": group_threads.BUNDLE["rows"],
        "shapes": results,
        "confirm": checked,
        "busy_shapes": busy,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(render(doc))


if __name__ == "__main__":
    main()
