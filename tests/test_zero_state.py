"""ZeRO stages over dense and expert state, on real gloo ranks (REFERENCE.md sec. 3).

Every stage must train exactly like stage 0 (same losses, same parameters after 3 steps, to
float32 rounding), and each rank must hold exactly the dim-0 chunks the convention says:
dense state over the dp ranks, expert state over the edp ranks. Also: the collective counter
counts a known sequence of calls, and the BASE token shuffle repeats itself when an activation
checkpoint replays it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from moespec.distributed.parity import plan_fields, plan_from_fields
from moespec.distributed.zero import chunk_range
from moespec.spec.plan import BaseRouter

from test_distributed import CAPACITY, DROPLESS, ROUTERS, free_port, variant

STEPS, SEED, LR = 3, 1234, 1e-2
# Gradients after the first step (same parameters in every stage): FSDP2 reduce-scatters and
# DDP all-reduces sum the same dp terms in another order, so they agree to float32 rounding,
# relative to each tensor's scale as in distributed/parity.py (observed ~1e-6).
GRAD_RTOL, GRAD_ATOL = 1e-5, 2e-5
# Parameters after 3 AdamW steps: AdamW divides by sqrt(v) ~ |g|, so where the dp terms of a
# gradient element cancel to ~1e-11 its rounding decides a step of up to ~lr * |g| / eps; a few
# elements move by up to ~1e-5 (observed at dp 4) while the update is ~lr = 1e-2 per step.
# Stages 0 and 1 do the same arithmetic in the same order: bit-identical (observed 0).
PARAM_ATOL = 5e-5
LOSS_ATOL = 1e-5  # losses ~5.5: ~20 float32 ulps (observed <= 5e-7)


def _setup_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def expected_bytes(model, ctx, stage: int) -> dict[str, int]:
    """The convention: full or dim-0 chunk (dense over dp, experts over edp) per kind of state."""
    from moespec.distributed.data_parallel import expert_parameter_names

    experts = set(expert_parameter_names(model))
    full = chunk = 0
    for name, p in model.named_parameters():
        world, rank, dim = ctx.dp_size, ctx.rank, 0
        if name in experts:  # [e_local, ., .]: by expert, or by dim 1 when e_local < edp
            world, rank, dim = ctx.edp_size, ctx.mesh.get_local_rank("edp"), (1 if ctx.edp_size > p.shape[0] else 0)
        start, stop = chunk_range(p.shape[dim], rank, world)
        full += p.numel() * 4  # float32 at every precision
        chunk += (stop - start) * (p.numel() // p.shape[dim]) * 4
    held = full if stage <= 1 else chunk
    return {"params": held, "grads": held, "optimizer": 2 * (full if stage == 0 else chunk)}


def train_steps(plan, ctx) -> dict:
    """STEPS optimizer steps of this rank from the same seed and batches, whatever the stage."""
    from moespec.distributed.data_parallel import all_reduce_mean, clip_grad_norm_distributed, shard_experts
    from moespec.distributed.state import count_collectives, state_bytes
    from moespec.model.build import build_model
    from moespec.train import prepare_training, train_step

    model = build_model(plan, seed=SEED, device=ctx.device)
    model.train()
    shard_experts(model, ctx)
    expected = expected_bytes(model, ctx, plan.parallel.zero_stage)
    setup = prepare_training(model, plan, dist_ctx=ctx, lr=LR)
    generator = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, 256, (STEPS, ctx.dp_size, plan.parallel.micro_batch, plan.model.seq_len + 1), generator=generator)
    losses, calls = [], []
    for step in range(STEPS):
        torch.manual_seed(SEED + 100 * step + ctx.rank)
        with count_collectives() as step_calls:
            loss, _, _ = train_step(setup, plan, [tokens[step, ctx.rank].to(ctx.device)])
        calls.append({kind: n for kind, n in step_calls.items() if n})
        losses.append(float(all_reduce_mean(loss, ctx)))
        if step == 0:  # same parameters in every stage so far: the reduced, clipped gradients must agree
            grads = _full({name: p.grad for name, p in setup.bare_model.named_parameters()})
            grad_norm = float(clip_grad_norm_distributed(setup.bare_model, float("inf"), ctx))  # scale 1: unchanged
    held = state_bytes(setup.bare_model, setup.optimizers)
    params = _full(dict(setup.bare_model.named_parameters()))
    return {"losses": losses, "params": params, "grads": grads, "grad_norm": grad_norm, "state_bytes": held,
            "expected_bytes": expected, "calls": calls}  # fmt: skip


def _full(tensors: dict) -> dict[str, torch.Tensor]:
    """Whole tensors (a DTensor gathered over its mesh: this rank's experts, or all of a dense one)."""
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone() for name, t in tensors.items()}


def zero_worker(rank: int, world: int, port: int, cases: list[tuple[str, dict]], out_dir: str) -> None:
    from moespec.distributed.context import init_distributed, shutdown

    _setup_rank(rank, world, port)
    results = []
    for name, fields in cases:
        plan = plan_from_fields(fields)
        ctx = init_distributed(plan, timeout_s=60)
        runs = {}
        for stage in (0, 1, 2, 3):
            staged = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, zero_stage=stage))
            runs[stage] = train_steps(staged, ctx)
        base = runs[0]
        for stage, run in runs.items():
            worst, worst_name = max((float((run["params"][n] - p).abs().max()), n) for n, p in base["params"].items())
            grads_off = [
                n for n, g in base["grads"].items()
                if not torch.allclose(run["grads"][n], g, rtol=GRAD_RTOL, atol=GRAD_ATOL * (float(g.abs().max()) or 1.0))
            ]  # fmt: skip
            results.append({
                "case": name, "stage": stage, "rank": rank, "losses": run["losses"], "base_losses": base["losses"],
                "max_param_diff": worst, "worst_param": worst_name, "grads_off": grads_off,
                "grad_norm": run["grad_norm"], "base_grad_norm": base["grad_norm"], "state_bytes": run["state_bytes"], "expected_bytes": run["expected_bytes"],
                "calls": run["calls"],
            })  # fmt: skip
    shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def run_zero(world: int, cases, tmp_path: Path) -> list[dict]:
    mp.spawn(zero_worker, args=(world, free_port(), cases, str(tmp_path)), nprocs=world, join=True)
    return [r for rank in range(world) for r in json.loads((tmp_path / f"rank{rank}.json").read_text())]


def zero_cases(dp: int, ep: int) -> list[tuple[str, dict]]:
    cases = [
        (f"dp{dp}-ep{ep}-{mode}", plan_fields(variant(dp=dp, ep=ep, router=ROUTERS["topk"], capacity=capacity)))
        for mode, capacity in (("capacity", CAPACITY), ("dropless", DROPLESS))
    ]
    if ep > 1 and dp // ep > 1:  # one expert per rank, dp/ep > 1 replicas: banks shard along dim 1
        plan = variant(dp=dp, ep=ep, router=ROUTERS["topk"], capacity=CAPACITY, n_experts=ep)
        cases.append((f"dp{dp}-ep{ep}-capacity-e{ep}", plan_fields(plan)))
    return cases


@pytest.mark.timeout(900)
@pytest.mark.parametrize("dp,ep", [(2, 2), (4, 2), (2, 1)], ids=["dp2-ep2", "dp4-ep2", "dp2-ep1"])
def test_every_zero_stage_trains_like_stage_0_and_holds_its_chunks(dp, ep, tmp_path):
    for r in run_zero(dp, zero_cases(dp, ep), tmp_path):
        label = f"{r['case']} stage {r['stage']} rank {r['rank']}"
        for a, b in zip(r["losses"], r["base_losses"]):
            assert abs(a - b) < LOSS_ATOL, (label, r["losses"], r["base_losses"])
        assert not r["grads_off"], (label, r["grads_off"])
        assert abs(r["grad_norm"] - r["base_grad_norm"]) <= GRAD_RTOL * r["base_grad_norm"], label
        assert r["max_param_diff"] < PARAM_ATOL, (label, r["max_param_diff"], r["worst_param"])
        assert r["state_bytes"] == r["expected_bytes"], label


def count_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from moespec.distributed.state import count_collectives

    _setup_rank(rank, world, port)
    dist.init_process_group("gloo")
    x = torch.ones(4)
    with count_collectives() as calls:
        dist.all_reduce(x)
        dist.all_reduce(x)
        dist.all_gather([torch.empty(4) for _ in range(world)], x)
        dist.all_gather_into_tensor(torch.empty(4 * world), x)
        dist.reduce_scatter_tensor(torch.empty(4 // world), x)
        dist.all_to_all_single(torch.empty(4), x)
        dist.broadcast(x, src=0)
        if rank == 0:
            dist.send(x, dst=1)
        else:
            dist.recv(x, src=0)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(calls))


@pytest.mark.timeout(120)
def test_count_collectives_counts_a_known_sequence(tmp_path):
    mp.spawn(count_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        calls = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert calls == {
            "all_to_all": 1, "all_reduce": 2, "all_gather": 2, "reduce_scatter": 1, "broadcast": 1,
            "send": 1 - rank, "recv": rank,
        }  # fmt: skip


def recompute_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """A BASE layer with the token shuffle, on 2 EP ranks, with and without checkpoint."""
    import torch.distributed as dist

    from moespec.distributed.expert_parallel import ExpertParallel
    from moespec.model.moe_layer import build_moe_layer
    from moespec.model.recompute import checkpoint
    from moespec.spec.plan import MoELayerPlan

    _setup_rank(rank, world, port)
    dist.init_process_group("gloo")
    plan = next(layer.moe for layer in variant(dp=2, ep=2, router=BaseRouter(shuffle=True), capacity=None).layers if layer.moe)
    assert isinstance(plan, MoELayerPlan)
    results = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        layer = build_moe_layer(plan, d_model=16, activation="swiglu", layer_index=1)
        layer.train()
        layer.shard_experts(ExpertParallel(group=dist.group.WORLD, rank=rank, size=world))
        losses = []
        for step in range(2):  # the second step draws a new permutation: replays must follow it
            x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(10 * step + rank), requires_grad=True)
            run = (lambda t: checkpoint(layer, t)) if recompute else layer
            y, _, aux = run(x)
            loss = (y.pow(2).sum() + aux) / 100
            loss.backward()
            losses.append(float(loss))
        grads = {name: p.grad.tolist() for name, p in layer.named_parameters() if p.grad is not None}
        results[str(recompute)] = {"losses": losses, "grads": grads, "x_grad": x.grad.tolist(), "shuffles": layer._shuffles}
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.timeout(120)
def test_base_shuffle_repeats_itself_under_activation_recomputation(tmp_path):
    mp.spawn(recompute_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        plain, replayed = r["False"], r["True"]
        assert plain["shuffles"] == replayed["shuffles"] == 2  # replays did not advance the counter
        assert plain["losses"] == replayed["losses"]
        # The replay recomputes the same ops on the same numbers: bit-identical gradients.
        assert plain["grads"] == replayed["grads"] and plain["x_grad"] == replayed["x_grad"]
