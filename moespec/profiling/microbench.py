"""Micro-benchmarks that `moespec calibrate` fits the backend to: matmuls, elementwise memory
traffic, collectives, and small models' training steps (for the fixed host overheads).

Every timing is the median of repeated runs after a warm-up, on this rank's threads; all ranks
run them at once, so memory-bus contention is what a multi-rank training run sees.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

# Small-model matmul shapes: T tokens x (D model, F hidden), forward and both backward forms.
DEFAULT_TOKENS = (256, 512, 1024)
DEFAULT_WIDTHS = ((64, 128), (64, 256), (128, 512), (256, 1024))
MEMORY_SIZES = tuple(2**p for p in range(15, 21))  # 32K..1M float32 elements (128 KiB..4 MiB)
COLLECTIVE_BYTES = tuple(2**p for p in range(12, 23, 2))  # 4 KiB..4 MiB per rank


def median_seconds(run: Callable[[], object], *, repeats: int, warmup: int = 3, sync: Callable[[], None] = lambda: None,
                   before: Callable[[], None] = lambda: None) -> float:  # fmt: skip
    """`before` runs untimed ahead of each repeat (a barrier, so ranks start together)."""
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        before()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_shapes(tokens=DEFAULT_TOKENS, widths=DEFAULT_WIDTHS) -> list[tuple[int, int, int]]:
    """(m, n, k) of x@W [T,D]x[D,F], grad_x [T,F]x[F,D] and grad_W [D,T]x[T,F]."""
    shapes = []
    for t in tokens:
        for d, f in widths:
            shapes += [(t, f, d), (t, d, f), (d, f, t)]
    return shapes


def time_matmuls(shapes, device: torch.device, *, repeats: int = 20) -> list[dict]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    results = []
    for m, n, k in shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        out = torch.empty(m, n, device=device)
        seconds = median_seconds(lambda: torch.mm(a, b, out=out), repeats=repeats, sync=sync)
        results.append({"m": m, "n": n, "k": k, "seconds": seconds})
    return results


def time_memory(device: torch.device, *, sizes=MEMORY_SIZES, repeats: int = 20) -> list[dict]:
    """c = a + b: reads two tensors and writes one, 3 * 4 bytes per element."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    results = []
    for n in sizes:
        a, b, c = (torch.randn(n, device=device) for _ in range(3))
        seconds = median_seconds(lambda: torch.add(a, b, out=c), repeats=repeats, sync=sync)
        results.append({"bytes": 3 * 4 * n, "seconds": seconds})
    return results


def time_collectives(device: torch.device, *, sizes=COLLECTIVE_BYTES, repeats: int = 10) -> tuple[list[dict], list[dict]]:
    """all_to_all_single (even splits) and all_reduce over the world; `bytes` is each rank's
    buffer. Every rank times the same calls; the slowest rank's median is what a step waits for."""
    world = dist.get_world_size()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a2a, allreduce = [], []
    for size in sizes:
        n = max(size // 4 // world * world, world)
        send, recv = torch.randn(n, device=device), torch.empty(n, device=device)
        buffer = torch.randn(n, device=device)
        t_a2a = median_seconds(lambda: dist.all_to_all_single(recv, send), repeats=repeats, sync=sync, before=dist.barrier)
        t_ar = median_seconds(lambda: dist.all_reduce(buffer), repeats=repeats, sync=sync, before=dist.barrier)
        times = torch.tensor([t_a2a, t_ar], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        a2a.append({"bytes": n * 4, "seconds": float(times[0])})
        allreduce.append({"bytes": n * 4, "seconds": float(times[1])})
    return a2a, allreduce


def time_training_step(plan, device: torch.device, *, steps: int = 30, warmup: int = 5, seed: int = 0, dist_ctx=None) -> float:
    """Median seconds of one real optimizer step of `plan`'s model, as `moespec profile` times
    it: with `dist_ctx` (a DistContext for the plan's layout) on every rank at once (DDP,
    expert-gradient reduction, clipping all-reduce included), each step started after a
    barrier, the slowest rank's time counted."""
    from moespec.distributed.data_parallel import shard_experts
    from moespec.model.build import build_model
    from moespec.profiling.measure import TrainingBatches
    from moespec.train import prepare_training, train_step

    distributed = dist_ctx is not None
    model = build_model(plan, seed=seed, device=device)
    if distributed:
        shard_experts(model, dist_ctx)
    setup = prepare_training(model, plan, dist_ctx=dist_ctx)
    batches = TrainingBatches(plan, device, seed, dist_ctx.rank if distributed else 0)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    before = dist.barrier if distributed else (lambda: None)
    seconds = median_seconds(lambda: train_step(setup, plan, batches.step()), repeats=steps, warmup=warmup, sync=sync, before=before)
    if distributed:
        slowest = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        seconds = float(slowest)
    return seconds
