"""Micro-benchmarks of `moespec calibrate` beside the operator database's (opbench.py):
collectives over the ranks, and whole training steps of the small fit models.

Every timing is the median of repeated runs after a warm-up, on this rank's threads; all ranks
run them at once, so memory-bus contention is what a multi-rank training run sees.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

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


def time_training_steps(plans: dict, device: torch.device, *, rounds: int = 20, warmup: int = 3, seed: int = 0,
                        dist_ctx=None) -> dict[str, float]:  # fmt: skip
    """Median seconds of one real optimizer step of each plan, as `moespec profile` times it
    (with `dist_ctx`, one DistContext or one per plan name, on every rank at once, DDP
    included, the slowest rank's), interleaved: round after round, one step of every plan, so that a machine whose speed
    drifts (a shared VM) moves every plan's median alike instead of skewing their ratios."""
    from moespec.model.build import build_model
    from moespec.profiling.measure import TrainingBatches
    from moespec.train import prepare_training, train_step

    distributed = dist_ctx is not None
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    steps = {}
    for name, plan in plans.items():
        ctx = dist_ctx.get(name) if isinstance(dist_ctx, dict) else dist_ctx
        model = build_model(plan, seed=seed, device=device)
        setup = prepare_training(model, plan, dist_ctx=ctx)
        batches = TrainingBatches(plan, device, seed, ctx.dp_rank if ctx is not None else 0)  # tp and pp ranks of a replica: one stream
        steps[name] = (lambda setup=setup, plan=plan, batches=batches: train_step(setup, plan, batches.step()))
    times: dict[str, list[float]] = {name: [] for name in plans}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            if distributed:
                dist.barrier()
            t0 = time.perf_counter()
            step()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    medians = torch.tensor([statistics.median(times[name]) for name in plans], dtype=torch.float64)
    if distributed:  # the slowest rank's
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return dict(zip(plans, medians.tolist()))
