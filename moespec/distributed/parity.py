"""Distributed == single process: the test of the distributed code (REFERENCE.md sec. 3).

One training step of the same spec and seed, run (a) in one process, routing each rank's
micro-batch as its own group and averaging the losses, and (b) over real ranks with expert
parallelism and data parallelism. Loss and every gradient must agree to float32 rounding.
Random routers draw the same numbers in both because each routing group re-seeds torch's
generator with `seed + rank` before its forward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moespec.spec.plan import SpecPlan

# float32 rounding: the distributed run sums the same products in a different order (expert
# buffers of another shape, gradients reduced by all-reduce), so the last bits may differ.
# Gradients range over 1e-4..1e-1 by tensor, so the absolute slack is relative to each
# tensor's own scale: 2e-5 of its largest entry (~170 float32 ulps of it); observed ~1e-6.
RTOL, SCALE_ATOL = 1e-5, 2e-5
ATOL = 1e-6  # for the loss (~5.5): ~ 20 float32 ulps


class CollectiveCounter(TorchDispatchMode):
    """Counts c10d collectives as the dispatcher sees them (what CommDebugMode does, without
    its module tracker, which fails under DDP's forward hooks in torch 2.13)."""

    def __init__(self, count_bytes: bool = False):
        super().__init__()
        self.counts: dict = {}
        self.bytes: dict = {}  # with count_bytes: the first tensor argument's bytes, per op (what a rank contributes)
        self.count_bytes = count_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if getattr(packet, "_qualified_op_name", "").startswith(("c10d::", "_c10d_functional::")):  # DTensor uses the functional ones
            self.counts[packet] = self.counts.get(packet, 0) + 1
            if self.count_bytes and args and isinstance(args[0], torch.Tensor):
                self.bytes[packet] = self.bytes.get(packet, 0) + args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


def parity_tokens(plan: SpecPlan, seed: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token batches for every dp rank, [dp, B, S+1], identical in every process; an
    encoder-decoder's inputs [dp, B, S_enc] besides."""
    generator = torch.Generator().manual_seed(seed)
    shape = (plan.parallel.dp, plan.parallel.micro_batch, plan.model.seq_len + 1)
    tokens = torch.randint(0, plan.model.vocab_size, shape, generator=generator)
    if plan.model.encoder is None:
        return tokens
    inputs = torch.randint(0, plan.model.vocab_size, (*shape[:2], plan.model.encoder.seq_len), generator=generator)
    return inputs, tokens


def _rank_batch(tokens, rank: int, device=None):
    picked = tuple(t[rank] for t in tokens) if isinstance(tokens, tuple) else (tokens[rank],)
    return tuple(t.to(device) for t in picked) if device is not None else picked


def _step_loss(model, batch: tuple) -> torch.Tensor:
    """batch: (tokens [B, S+1],) or, for an encoder-decoder, (inputs [B, S_enc], tokens)."""
    *inputs, tokens_BS1 = batch
    logits, aux = model(*inputs, tokens_BS1[:, :-1])
    ce = F.cross_entropy(logits.float().flatten(0, 1), tokens_BS1[:, 1:].flatten())
    return ce + aux.aux_loss


def reference_step(plan: SpecPlan, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Single process: mean over the dp routing groups of each group's loss; full gradients."""
    from moespec.model.build import build_model

    model = build_model(plan, seed=seed)
    model.train()
    tokens = parity_tokens(plan, seed)
    total = torch.zeros(())
    for rank in range(plan.parallel.dp):
        torch.manual_seed(seed + rank)
        total = total + _step_loss(model, _rank_batch(tokens, rank)) / plan.parallel.dp
    total.backward()
    return float(total.detach()), {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def distributed_step(plan: SpecPlan, ctx, seed: int) -> tuple[float, dict[str, torch.Tensor], tuple[int, int], object]:
    """This rank's share of the same step; returns (global loss, local grads,
    (a2a bytes sent to other ranks, all-to-all calls counted by CommDebugMode), model)."""
    from moespec.distributed.data_parallel import (
        all_reduce_mean,
        moe_layers,
        reduce_expert_gradients,
        shard_experts,
        unwrap,
        wrap_data_parallel,
    )
    from moespec.model.build import build_model

    model = build_model(plan, seed=seed, device=ctx.device)
    model.train()
    shard_experts(model, ctx)
    wrapped = wrap_data_parallel(model, ctx)
    tokens = parity_tokens(plan, seed)
    torch.manual_seed(seed + ctx.rank)
    with CollectiveCounter() as comm:  # counts at the dispatcher, independent of our counter
        loss = _step_loss(wrapped, _rank_batch(tokens, ctx.rank, ctx.device))
        loss.backward()
    all_to_alls = comm.counts.get(torch.ops.c10d.alltoall_base_, 0)
    reduce_expert_gradients(wrapped, ctx)
    grads = {name: p.grad.detach().cpu().clone() for name, p in unwrap(wrapped).named_parameters() if p.grad is not None}
    a2a = sum(layer.expert_parallel.counter.total_bytes for layer in moe_layers(model) if layer.expert_parallel)
    return float(all_reduce_mean(loss, ctx).cpu()), grads, (a2a, all_to_alls), model


def compare_with_reference(plan: SpecPlan, ctx, seed: int) -> dict:
    """Run both and compare on this rank; expert gradients against this rank's slice."""
    from moespec.distributed.data_parallel import expert_parameter_names

    ref_loss, ref_grads = reference_step(plan, seed)
    loss, grads, (a2a_bytes, all_to_alls), model = distributed_step(plan, ctx, seed)
    expert_names = set(expert_parameter_names(model))
    worst, mismatched = 0.0, []
    for name, grad in grads.items():
        expected = ref_grads[name]
        if name in expert_names:
            local = grad.shape[0]
            expected = expected[ctx.ep_rank * local : (ctx.ep_rank + 1) * local]
        if expected.shape != grad.shape:
            mismatched.append(name)
            continue
        scale = float(expected.abs().max()) or 1.0
        if not torch.allclose(grad, expected, rtol=RTOL, atol=SCALE_ATOL * scale):
            mismatched.append(name)
        worst = max(worst, float((grad - expected).abs().max()) / scale)
    missing = sorted(set(ref_grads) - set(grads))
    return {
        "rank": ctx.rank,
        "loss": loss,
        "reference_loss": ref_loss,
        "loss_ok": abs(loss - ref_loss) <= ATOL + RTOL * abs(ref_loss),
        "grads_checked": len(grads),
        "mismatched": mismatched,
        "missing": missing,
        "max_rel_grad_diff": worst,  # largest |diff| / tensor scale
        "a2a_bytes": a2a_bytes,
        "all_to_all_calls": all_to_alls,
    }


def run_cases(rank: int, world: int, port: int, cases: list[tuple[str, dict]], out_dir: str, measure, *,
              device: str = "cpu", timeout_s: float = 60) -> None:  # fmt: skip
    """One spawned rank (torchrun's environment set by hand, one thread): `measure(plan, ctx)`
    for every case in turn, the results written to out_dir/rank<r>.json."""
    from moespec.distributed.context import init_distributed, shutdown

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = []
    for name, fields in cases:
        plan = plan_from_fields(fields)
        ctx = init_distributed(plan, timeout_s=timeout_s, device=device)
        results.append({"case": name, **measure(plan, ctx)})
    shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def parity_worker(rank: int, world: int, port: int, cases: list[tuple[str, dict]], out_dir: str, device: str = "cpu") -> None:
    """mp.spawn entry: one process per rank runs every case and writes its results as JSON."""
    run_cases(rank, world, port, cases, out_dir, lambda plan, ctx: compare_with_reference(plan, ctx, seed=1234), device=device)


def plan_from_fields(fields: dict) -> SpecPlan:
    """Rebuild a plan in a spawned rank: plans travel as emitted spec YAML (plain data)."""
    from moespec.spec import plan_from_text

    return plan_from_text(fields["yaml"], fields.get("name", "<parity>"))


def plan_fields(plan: SpecPlan) -> dict:
    from moespec.spec.emit import plan_to_yaml

    return {"yaml": plan_to_yaml(plan), "name": plan.name}



def model_parallel_tokens(plan: SpecPlan, seed: int) -> torch.Tensor:
    """[dp, n_micro * B, S+1]: every dp replica's micro-batches for one step, identical in every process."""
    p = plan.parallel
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, plan.model.vocab_size, (p.dp, p.grad_accum * p.micro_batch, plan.model.seq_len + 1), generator=generator)


def compare_model_parallel(plan: SpecPlan, ctx, seed: int) -> dict:
    """Tensor/pipeline parallel step == single process: this rank's (tp, pp, dp, ep) share of
    one step's gradients (DTensor shards gathered whole, pipeline stages under the full
    model's names) against a single process accumulating the same micro-batches; plus the
    collectives one micro-step's forward and backward called."""
    import dataclasses

    from moespec.distributed.data_parallel import all_reduce_mean, expert_parameter_names
    from moespec.distributed.model_parallel import sync_gradients
    from moespec.model.build import build_model
    from moespec.train import accumulate_gradients, merge_step_aux, prepare_training

    p = plan.parallel
    tokens = model_parallel_tokens(plan, seed)
    n_micro, B = p.grad_accum, p.micro_batch
    single = dataclasses.replace(plan, parallel=dataclasses.replace(p, dp=1, ep=1, tp=1, pp=1))
    reference = build_model(single, seed=seed)
    # Random routers (noise, SparseMixer's sampling) draw from torch's generator: the same
    # seed before both runs gives every tp rank the single process's draws (pp ranks, which
    # draw for their own layers only, are compared on deterministic routers)
    torch.manual_seed(seed)
    total = torch.zeros(())
    for rank in range(p.dp):
        for m in range(n_micro):
            total = total + _step_loss(reference, (tokens[rank, m * B : (m + 1) * B],)) / (p.dp * n_micro)
    total.backward()
    ref_grads = {name: q.grad for name, q in reference.named_parameters()}

    model = build_model(plan, seed=seed, device=ctx.device)
    model.train()
    from moespec.distributed.parallelize import apply_recompute

    apply_recompute(model, p.recompute)  # as train() does: the replay must give the same gradients
    setup = prepare_training(model, plan, dist_ctx=ctx)
    windows = [tokens[ctx.dp_rank, m * B : (m + 1) * B] for m in range(n_micro)]
    torch.manual_seed(seed)
    with CollectiveCounter() as comm:
        per_micro = accumulate_gradients(setup, plan, windows)
    sync_gradients(setup)
    loss = float(all_reduce_mean(merge_step_aux(per_micro)[0].to(ctx.device), ctx).cpu())
    experts = set(expert_parameter_names(setup.bare_model))
    worst, mismatched, checked = 0.0, [], 0
    for name, param in setup.bare_model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        full_name = name.split(".", 1)[1] if setup.pipeline is not None else name  # "<stage>.blocks.3..." -> "blocks.3..."
        expected = ref_grads[full_name]
        if name in experts:
            local = grad.shape[0]
            expected = expected[ctx.ep_rank * local : (ctx.ep_rank + 1) * local]
        checked += 1
        scale = float(expected.abs().max()) or 1.0
        if expected.shape != grad.shape or not torch.allclose(grad.cpu(), expected, rtol=RTOL, atol=SCALE_ATOL * scale):
            mismatched.append(full_name)
        elif grad.shape == expected.shape:
            worst = max(worst, float((grad.cpu() - expected).abs().max()) / scale)
    from moespec.distributed.state import count_collectives, state_bytes

    with count_collectives() as step_calls:  # ZeRO-1 gathers its parameters after the step
        for optimizer in setup.optimizers:  # AdamW's state exists after a step: what a rank holds at rest
            optimizer.step()
    return {
        "rank": ctx.rank,
        "pp_rank": ctx.pp_rank,
        "stage_blocks": [list(m.bounds) for m in setup.pipeline.modules] if setup.pipeline is not None else None,
        "state_bytes": state_bytes(setup.bare_model, setup.optimizers),
        "loss": loss,
        "reference_loss": float(total.detach()),
        "loss_ok": abs(loss - float(total.detach())) <= ATOL + RTOL * abs(float(total.detach())),
        "grads_checked": checked,
        "mismatched": mismatched,
        "max_rel_grad_diff": worst,
        "collectives": {str(k): v for k, v in comm.counts.items()},
        "optimizer_collectives": dict(step_calls),
    }


def model_parallel_worker(rank: int, world: int, port: int, cases: list[tuple[str, dict]], out_dir: str) -> None:
    """mp.spawn entry for `compare_model_parallel` over every case."""
    run_cases(rank, world, port, cases, out_dir, lambda plan, ctx: compare_model_parallel(plan, ctx, seed=1234))
