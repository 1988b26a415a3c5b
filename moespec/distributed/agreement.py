"""The runtime's side of the agreement matrix: what one real training step on this rank holds,
computes and sends, to be compared with the cost model's prediction for the same plan
(REFERENCE.md sec. 4; tests/test_agreement.py).

One optimizer step of `train`'s own path (experts sharded, recomputation applied, DDP or FSDP2
and the ZeRO optimizer of the spec's stage, gradient accumulation over the spec's micro-batches),
measured at once on this rank:
- matmul FLOPs per micro-step, by torch's FlopCounterMode (recomputed forwards included);
- bytes sent to other ranks per micro-step by the expert dispatch/combine all-to-alls and by
  BASE's token shuffle, by the layers' own counters;
- bytes of parameters, gradients and AdamW state held after the step (`state.state_bytes`);
- collective calls by kind at the dispatcher (`state.count_collectives`).
"""

from __future__ import annotations

import torch

from moespec.model.flops import flop_counter
from moespec.spec.plan import SpecPlan


def measure_step(plan: SpecPlan, ctx, seed: int) -> dict:
    """This rank's figures for one optimizer step of `plan` (see the module docstring)."""
    from moespec.distributed.data_parallel import moe_layers
    from moespec.distributed.parallelize import apply_recompute
    from moespec.distributed.state import count_collectives, state_bytes
    from moespec.model.build import build_model
    from moespec.train import prepare_training, train_step

    p = plan.parallel
    model = build_model(plan, seed=seed, device=ctx.device)
    apply_recompute(model, p.recompute)
    setup = prepare_training(model, plan, dist_ctx=ctx)
    setup.model.train()
    generator = torch.Generator().manual_seed(seed + ctx.rank)
    windows = [torch.randint(0, plan.model.vocab_size, (p.micro_batch, plan.model.seq_len + 1), generator=generator).to(ctx.device)
               for _ in range(p.grad_accum)]  # fmt: skip
    with flop_counter() as flops, count_collectives() as calls:
        train_step(setup, plan, windows)
    expert_parallel = [layer.expert_parallel for layer in moe_layers(model) if layer.expert_parallel is not None]
    return {
        "rank": ctx.rank,
        "flops_per_microstep": flops.get_total_flops() / p.grad_accum,
        "a2a_bytes_per_microstep": sum(ep.counter.total_bytes for ep in expert_parallel) / p.grad_accum,
        "shuffle_bytes_per_microstep": sum(ep.shuffle_counter.total_bytes for ep in expert_parallel) / p.grad_accum,
        "state_bytes": state_bytes(setup.bare_model, setup.optimizers),
        "calls": {kind: n for kind, n in calls.items() if n},
    }


def agreement_worker(rank: int, world: int, port: int, cases: list[tuple[str, dict]], out_dir: str) -> None:
    """mp.spawn entry: one process per rank measures every case and writes rank<r>.json."""
    from moespec.distributed.parity import run_cases

    run_cases(rank, world, port, cases, out_dir, lambda plan, ctx: measure_step(plan, ctx, seed=7), timeout_s=120)
