"""Micro-benchmarks of the operator database (sim/opdb.py): each op family a step runs, at
the shapes models use, on this rank's threads while every rank runs them at once.

- Linear forward + backward (autograd, autocast for bf16: the kernels the model runs) on a
  grid of (M, K, N); attention (causal SDPA) forward + backward on a grid of (S, hd);
- host seconds per op: tiny dense models of 1 and 3 blocks (every op launch-bound) minus
  what the database already explains, over the ops optrace.py counts in a block;
- per-op cost of the dropless experts' kernel (tiny models with 4 and 16 experts);
- memory-bound bandwidth: dense models of 1 and 3 blocks at 4096 tokens of width 64;
- gather bandwidth (index_select + index_add_ of rows); clipping + AdamW per tensor and per
  parameter.
Every timing is a median of repeats after a warm-up; a repeat count adapts to the op's size
(at least `min_repeats`, up to a time budget) so that the whole database takes ~1 minute.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

# Grids (log-spaced; the database interpolates between them and holds the edge rate beyond).
LINEAR_GRID = {
    "fp32": {"m": [16, 64, 256, 1024, 4096], "k": [32, 128, 512, 2048], "n": [32, 128, 512, 2048]},
    # CPU bf16 kernels dip at powers of two (M 512: 2.9 GFLOP/s at 256 x 256, 3.7 at 384 x 384,
    # 5.4 at 384 x 256): the grid holds model widths at 1x and 1.5x powers of two.
    "bf16": {"m": [16, 128, 512], "k": [32, 128, 256, 384, 512, 768], "n": [32, 128, 256, 384, 512, 768]},
}
BMM_GRID = {  # experts, rows per expert, width (K = N): per-expert cost grows with the bank's bytes (caches)
    "fp32": {"e": [8, 32], "c": [4, 16, 64, 256], "w": [64, 256, 512]},
    "bf16": {"e": [8, 32], "c": [4, 32, 128], "w": [64, 128, 256, 384]},
}
ATTENTION_GRID = {"fp32": {"s": [64, 256, 1024], "hd": [16, 64, 128]}, "bf16": {"s": [64, 256, 512], "hd": [16, 64, 128]}}
ATTENTION_HEADS = 4  # batch x heads of each attention measurement
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(run: Callable[[], object], *, sync: Callable[[], None], min_repeats: int = 3, budget_s: float = 0.05,
          max_repeats: int = 20) -> float:  # fmt: skip
    """Median seconds of `run` after one warm-up call: at least `min_repeats`, more while
    the total stays under `budget_s`. Ranks start each measurement together (a barrier), so
    that every rank's op runs beside the others' as in a step, not beside a rank that has
    moved on or is waiting."""
    _lockstep()
    t0 = time.perf_counter()
    run()
    sync()
    if time.perf_counter() - t0 > 0.2:  # a long op is steady: one more run is enough (calibration within 2 minutes)
        min_repeats = 1
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < budget_s):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _lockstep() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def slowest_rank(ops: dict) -> dict:
    """The database as the slowest rank measured it, point by point: every time (grids'
    seconds, floors, per-call and per-op seconds) at its largest over the ranks, every
    bandwidth at its smallest. Identity on one rank. Why the slowest: ranks meet at every
    collective of a step, so the step runs at the slower rank's pace. Measured here (2-core
    VM, one calibration each, held-out world-2 specs): unsynchronised per-rank timing left
    h09-h12 13-20% fast; lockstep with the slowest rank gave -8.6%, +3.6%, +20.9%, -12.3%;
    lockstep with the mean gave h09 -22.6% (the VM's speed drifts 20% within the hour)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ops
    leaves: list[tuple[object, object, bool]] = []  # (container, key, is a rate)

    def walk(node, rate_keys=("bandwidth_Bps", "gather_Bps")):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if key == "axes":
                continue
            if isinstance(value, (dict, list)):
                walk(value)
            elif isinstance(value, float):
                leaves.append((node, key, key in rate_keys))

    walk(ops)
    # a rate's slowest is its smallest: reduce its reciprocal (seconds per byte) with the times' MAX
    values = torch.tensor([1.0 / node[key] if rate else node[key] for node, key, rate in leaves], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    for (node, key, rate), value in zip(leaves, values.tolist()):
        node[key] = 1.0 / value if rate else value
    return ops


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _autocast(dtype: str, device: torch.device):
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


def backward_call_s(device: torch.device) -> float:
    """Seconds of starting autograd's engine on a one-op graph: a step pays it once, not
    once per op, so it is taken out of every per-op timing below."""
    x = torch.randn(1, device=device, requires_grad=True)

    def run():
        (x * 1.0).backward()
        x.grad = None

    return timed(run, sync=_sync(device), min_repeats=20)


def _time_product(device: torch.device, dtype: str, product, x_shape, w_shape, *, min_repeats: int, max_repeats: int = 20) -> float:
    """Forward + backward of product(x, w) (x and w needing gradients, as a layer's input
    and weight do; autocast for bf16), autograd engine start included: callers subtract it."""
    x = torch.randn(*x_shape, device=device, requires_grad=True)
    w = torch.randn(*w_shape, device=device, requires_grad=True)
    with _autocast(dtype, device):
        grad = torch.ones_like(product(x.detach(), w.detach()))

    def run():
        with _autocast(dtype, device):
            y = product(x, w)
        y.backward(grad)
        x.grad = w.grad = None

    return timed(run, sync=_sync(device), min_repeats=min_repeats, max_repeats=max_repeats)


def time_linear(device: torch.device, dtype: str, m: int, k: int, n: int, *, min_repeats: int = 3) -> float:
    """Forward + backward of Linear(K -> N) on M rows: mm, and the two gradient matmuls."""
    return _time_product(device, dtype, F.linear, (m, k), (n, k), min_repeats=min_repeats)


# The machine probe: Linear 512 -> 512 on 256 rows, fp32, forward + backward, one thread.
PROBE_SHAPE = (256, 512, 512)


def machine_probe_s(device: torch.device) -> float:
    """Seconds of one fixed workload (PROBE_SHAPE, median of 40: 0.2 s), on one intra-op thread.
    `calibrate` records it and `profile` times it again before its timed steps: the ratio says
    how fast this machine runs now against when it was calibrated. A 2-core VM's cores run
    20-25% slower for minutes after minutes of load, a neighbour takes a share; a calibration
    carries the speed of its moment (bench/accuracy.py measured held-out errors of +15-47%
    with a calibration made in such a slow stretch). All ranks time it at once (`timed`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m, k, n = PROBE_SHAPE  # 40 repeats: medians of 15 wandered by +-15% on a quiet VM, of 40 by +-4%
        return _time_product(device, "fp32", F.linear, (m, k), (n, k), min_repeats=40, max_repeats=40)
    finally:
        torch.set_num_threads(threads)


def time_bmm(device: torch.device, dtype: str, e: int, c: int, k: int, n: int, *, min_repeats: int = 3) -> float:
    """Forward + backward of a capacity expert bank's projection, [E, C, K] @ [E, K, N]."""
    return _time_product(device, dtype, torch.bmm, (e, c, k), (e, k, n), min_repeats=min_repeats)


def time_attention(device: torch.device, dtype: str, s: int, hd: int, *, min_repeats: int = 3) -> float:
    """Causal SDPA forward + backward over ATTENTION_HEADS heads of S x hd, per head."""
    q, k, v = (torch.randn(1, ATTENTION_HEADS, s, hd, device=device, dtype=DTYPES[dtype], requires_grad=True) for _ in range(3))
    grad = torch.randn(1, ATTENTION_HEADS, s, hd, device=device, dtype=DTYPES[dtype])

    def run():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.backward(grad)
        q.grad = k.grad = v.grad = None

    return timed(run, sync=_sync(device), min_repeats=min_repeats) / ATTENTION_HEADS


def linear_grid(device: torch.device, dtype: str, *, quick: bool = False, engine_s: float = 0.0) -> dict:
    axes = LINEAR_GRID[dtype]
    if quick:
        axes = {name: points[::2] for name, points in axes.items()}

    def one(m, k, n, repeats):
        return max(time_linear(device, dtype, m, k, n, min_repeats=repeats) - engine_s, 1e-7)

    seconds = [[[one(m, k, n, 1 if quick else 3) for n in axes["n"]] for k in axes["k"]] for m in axes["m"]]
    floor = one(1, 1, 1, 10)
    return {"axes": axes, "seconds": seconds, "floor_s": floor}


def bmm_grid(device: torch.device, dtype: str, *, quick: bool = False, engine_s: float = 0.0) -> dict:
    """Seconds of a bank's batched projection: E experts, C rows each, K = N = w."""
    axes = BMM_GRID[dtype]
    if quick:
        axes = {name: points[::2] for name, points in axes.items()}

    def one(e, c, w, repeats):
        return max(time_bmm(device, dtype, e, c, w, w, min_repeats=repeats) - engine_s, 1e-7)

    seconds = [[[one(e, c, w, 1 if quick else 3) for w in axes["w"]] for c in axes["c"]] for e in axes["e"]]
    return {"axes": axes, "seconds": seconds, "floor_s": one(1, 1, 1, 10)}


def attention_grid(device: torch.device, dtype: str, *, quick: bool = False, engine_s: float = 0.0) -> dict:
    axes = ATTENTION_GRID[dtype]
    if quick:
        axes = {name: points[::2] for name, points in axes.items()}

    def one(s, hd, repeats):
        return max(time_attention(device, dtype, s, hd, min_repeats=repeats) * ATTENTION_HEADS - engine_s, 1e-7) / ATTENTION_HEADS

    seconds = [[one(s, hd, 1 if quick else 3) for hd in axes["hd"]] for s in axes["s"]]
    floor = one(1, 8, 10) * ATTENTION_HEADS
    return {"axes": axes, "seconds": seconds, "floor_s": floor}


def gather_bandwidth(device: torch.device, *, rows: int = 16384, width: int = 128) -> float:
    """Bytes per second of index_select + index_add_ over random rows: 4 passes of [rows, D]."""
    x = torch.randn(rows, width, device=device)
    index = torch.randint(0, rows, (rows,), device=device)
    y = torch.zeros_like(x)

    def run():
        y.index_add_(0, index, x.index_select(0, index))

    return 4 * rows * width * 4 / timed(run, sync=_sync(device), min_repeats=5)


OPTIMIZER_SIZES = [1 << 16, 1 << 20, 1 << 22]  # parameters per tensor: cache-resident to far past the caches
OPTIMIZER_TOTAL = 1 << 24  # parameters per measurement (256 MB of p, g, m, v)


def optimizer_costs(device: torch.device) -> tuple[float, dict]:
    """(seconds per op on a tiny tensor, {"axes": {"size": ...}, "seconds": ...} seconds per
    OPTIMIZER_TOTAL parameters in tensors of each size) of clip_grad_norm_ + AdamW as
    train_step runs them (torch's defaults, as build_optimizers)."""
    from moespec.sim.ops import OPTIMIZER_OPS, OPTIMIZER_OPS_PER_TENSOR

    def run_for(count: int, size: int) -> float:
        params = [torch.nn.Parameter(torch.randn(size, device=device)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3)

        def run():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        return timed(run, sync=_sync(device), min_repeats=3)

    op_s = run_for(64, 4) / (OPTIMIZER_OPS + OPTIMIZER_OPS_PER_TENSOR * 64)
    seconds = []
    for size in OPTIMIZER_SIZES:
        count = OPTIMIZER_TOTAL // size
        seconds.append(max(run_for(count, size) - op_s * (OPTIMIZER_OPS + OPTIMIZER_OPS_PER_TENSOR * count), 1e-7) / count)
    return op_s, {"axes": {"size": OPTIMIZER_SIZES}, "seconds": seconds}


GROUPED_GRID = {  # rows per expert, width (D = F): the real dropless kernel, 8 groups per call
    "fp32": {"n": [8, 32, 128, 512], "w": [32, 128, 512]},
    "bf16": {"n": [8, 64, 256], "w": [32, 128, 256]},
}
GROUPED_EXPERTS = 8


def uneven_counts(n: int, groups: int) -> list[int]:
    """n rows per group on average, alternately n + n/4 and n - n/4: routed groups are never
    all equal, and equal ones would time the kernel's one-bmm engine, which only BASE's
    balanced groups run (`group_matmuls.engine`), instead of the one a top-k layer runs."""
    delta = n // 4
    return [n + delta if i % 2 == 0 else n - delta for i in range(groups)] if groups > 1 else [n]


def grouped_grid(device: torch.device, dtype: str, *, quick: bool = False, engine_s: float = 0.0) -> dict:
    """Seconds per group of the dropless experts (`ExpertBank.forward_dropless`, SwiGLU,
    gather, gated combine, forward + backward) with n rows per expert on average (uneven:
    `uneven_counts`) of width w = D = F,
    beside `call_s`, the fixed cost of one call (one group of one row), taken out of each:
    its per-group matmuls run on slices with `out=` and transposed operands, at rates the
    Linear grid does not show, and its dispatch is per group."""
    from moespec.model.experts import ExpertBank

    axes = GROUPED_GRID[dtype]
    if quick:
        axes = {name: points[::2] for name, points in axes.items()}

    def call(n, w, repeats, groups=GROUPED_EXPERTS):
        bank = ExpertBank(n_experts=groups, d_model=w, d_ff=w, activation="swiglu").to(device)
        rows = n * groups
        x = torch.randn(rows, w, device=device, requires_grad=True)
        token = torch.arange(rows, device=device)
        gate = torch.rand(rows, device=device, requires_grad=True)
        counts = uneven_counts(n, groups)

        def run():
            with _autocast(dtype, device):
                y = bank.forward_dropless(x, token, gate, counts)
            y.sum().backward()
            x.grad = gate.grad = None
            bank.zero_grad(set_to_none=True)

        return max(timed(run, sync=_sync(device), min_repeats=repeats) - engine_s, 1e-7)

    call_s = call(1, 8, 10, groups=1)  # one call's fixed cost: the Function, its buffers, the loss around it
    seconds = [[max(call(n, w, 1 if quick else 3) - call_s, 1e-8) / GROUPED_EXPERTS for w in axes["w"]] for n in axes["n"]]
    return {"axes": axes, "seconds": seconds, "call_s": call_s}


def elementwise_bandwidth(device: torch.device, *, tokens: int = 4096, width: int = 256) -> float:
    """Bytes per second of a block's memory-bound ops on [tokens, width] fp32 activations:
    RMSNorm, SiLU-gated product and a residual add, forward and backward; bytes counted as
    each op's inputs read and outputs written (what the model's elementwise bytes count)."""
    x = torch.randn(tokens, width, device=device, requires_grad=True)
    u = torch.randn(tokens, width, device=device, requires_grad=True)
    weight = torch.ones(width, device=device, requires_grad=True)

    def run():
        h = F.rms_norm(x, (width,), weight)
        y = F.silu(h) * u + x
        y.backward(torch.ones_like(y))
        x.grad = u.grad = weight.grad = None

    # forward: norm 2 passes, silu 2, mul 3, add 3; backward about twice that
    passes = 3 * (2 + 2 + 3 + 3)
    return passes * tokens * width * 4 / timed(run, sync=_sync(device), min_repeats=5)


# E up to 256: past the grid the rate is held at the edge's, and from E 64 that over-predicted
# the solve 1.14-1.5x at E 128 and 256 (T 1024 and 4096, measured 2026-12-01 on cpu-local).
AUCTION_GRID = {"t": [256, 1024, 4096], "e": [4, 16, 64, 256]}


def auction_grid(device: torch.device, *, quick: bool = False) -> dict:
    """Seconds of BASE's balanced assignment (model/auction.py, the real solver) of T tokens
    to E experts, on scores shaped like an initialised model's router logits on byte text:
    every occurrence of a token gets the same row (at init the residual stream is mostly the
    token's embedding), tokens drawn from the shipped corpus. Its rounds depend on the scores:
    such ties cost ~10x what random scores do (measured: 112 ms against 12 ms at 512 x 16),
    and a trained router's scores cost less; this is the cost at the start of training."""
    from moespec.data.corpus import load_corpus_bytes
    from moespec.model.balanced_routers import balanced_expert_index

    axes = {name: points[::2] for name, points in AUCTION_GRID.items()} if quick else AUCTION_GRID
    generator = torch.Generator(device="cpu").manual_seed(0)
    text = torch.frombuffer(bytearray(load_corpus_bytes()[: 1 << 16]), dtype=torch.uint8).long()

    def one(t, e):
        table = torch.randn(256, e, generator=generator) * 0.3
        scores = table[text[:t]].to(device)
        return timed(lambda: balanced_expert_index(scores, eps=None)[0], sync=_sync(device), min_repeats=3)

    return {"axes": axes, "seconds": [[one(t, e) for e in axes["e"]] for t in axes["t"]]}
