"""Data parallel with expert parallelism inside it (REFERENCE.md sec. 3).

Every rank builds the full model from the same seed (identical init, as a single-process run
would have), then keeps only its E/ep experts. Dense parameters are averaged over all dp
ranks by torch's DDP; expert parameters are excluded from DDP and reduced over exactly their
expert-data-parallel group. Why the expert gradient is divided by dp, not by the edp size:
after the backward all-to-all, a rank's expert gradient already sums the contributions of
every rank in its EP group (sum_r dL_r/dw over the group); summing over the edp replicas
gives the sum over all dp ranks, and the global loss is the mean of the dp ranks' losses.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from moespec.distributed.context import DistContext
from moespec.distributed.expert_parallel import ExpertParallel


def moe_layers(model: nn.Module) -> list[nn.Module]:
    from moespec.model.moe_layer import MoELayer

    return [module for module in model.modules() if isinstance(module, MoELayer)]


def shard_experts(model: nn.Module, ctx: DistContext) -> None:
    """Keep experts [ep_rank * L, (ep_rank + 1) * L) of every MoE layer and attach the EP group.
    With ep = 1 every rank keeps all experts and no all-to-all runs at all."""
    if ctx.ep_size == 1:
        return
    for layer in moe_layers(model):
        layer.shard_experts(ExpertParallel(group=ctx.ep_group, rank=ctx.ep_rank, size=ctx.ep_size))


def expert_parameter_names(model: nn.Module) -> list[str]:
    from moespec.model.experts import ExpertBank

    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertBank):
            names += [f"{module_name}.{name}" for name, _ in module.named_parameters()]
    return names


def wrap_data_parallel(model: nn.Module, ctx: DistContext, *, zero_stage: int = 0) -> nn.Module:
    """Data parallel for the dense parameters only (experts are reduced over their own group).

    ZeRO stages 0 and 1: DDP (stage 1 shards optimizer state in `build_optimizers`).
    Stages 2 and 3: torch's FSDP2 `fully_shard` over the dp ranks, experts left out through
    `ignored_params`; stage 3 frees the gathered parameters after forward, stage 2 keeps them
    until backward (FSDP2's closest counterpart of ZeRO-2: gradients and optimizer state
    sharded, parameters gathered once per step)."""
    if ctx.dp_size == 1:
        return model
    if zero_stage >= 2:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        names = set(expert_parameter_names(model))
        experts = {p for name, p in model.named_parameters() if name in names}
        dp_mesh = init_device_mesh(ctx.device.type, (ctx.dp_size,), mesh_dim_names=("dp",))
        return fully_shard(model, mesh=dp_mesh, reshard_after_forward=zero_stage >= 3, ignored_params=experts)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    with warnings.catch_warnings():
        # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, whose False still
        # syncs at init; we want neither, and the old spelling says exactly that.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(
            model,
            process_group=ctx.dp_group,
            broadcast_buffers=False,  # router bias buffers are kept equal by their own all-reduce
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        )


def reduce_expert_gradients(model: nn.Module, ctx: DistContext) -> None:
    """Sum expert gradients over the edp group and divide by dp (see the module docstring)."""
    names = set(expert_parameter_names(unwrap(model)))
    grads = [p.grad for name, p in unwrap(model).named_parameters() if name in names and p.grad is not None]
    if not grads:
        return
    if ctx.edp_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ctx.edp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    for g in grads:
        g.div_(ctx.dp_size)


def unwrap(model: nn.Module) -> nn.Module:
    """The model without DDP's wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a scalar over the dp ranks (for reporting the global loss)."""
    value = value.detach().clone()
    if ctx.dp_size > 1:
        dist.all_reduce(value, group=ctx.dp_group)
    return value / ctx.dp_size


def clip_grad_norm_distributed(model: nn.Module, max_norm: float, ctx: DistContext) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient, as one process would: dense gradients
    are equal on every rank after DDP; each rank of an EP group holds different experts, so
    their squared norms are summed over the EP group."""
    names = set(expert_parameter_names(model))
    dense_sq = torch.zeros((), dtype=torch.float32)
    expert_sq = torch.zeros((), dtype=torch.float32)
    sharded_sq = torch.zeros((), dtype=torch.float32)
    params = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        params.append(p)
        grad = p.grad.detach()
        if isinstance(grad, DTensor):  # FSDP2 (ZeRO-2/3): each rank holds a shard of it
            sharded_sq += grad.to_local().float().pow(2).sum().cpu()
            continue
        square = grad.float().pow(2).sum().cpu()
        if name in names:
            expert_sq += square
        else:
            dense_sq += square
    if sharded_sq.item() or any(isinstance(p.grad, DTensor) for p in params):
        sharded_sq = sharded_sq.to(ctx.device)
        dist.all_reduce(sharded_sq, group=ctx.dp_group)
        dense_sq += sharded_sq.cpu()
    if ctx.ep_size > 1:
        expert_sq = expert_sq.to(ctx.device)
        dist.all_reduce(expert_sq, group=ctx.ep_group)
        expert_sq = expert_sq.cpu()
    total_norm = (dense_sq + expert_sq).sqrt()
    scale = float((max_norm / (total_norm + 1e-6)).clamp(max=1.0))
    for p in params:
        p.grad.mul_(scale)
    return total_norm


def global_step_view(loss: torch.Tensor, ce: torch.Tensor, aux, ctx: DistContext):
    """The step as a whole job sees it: losses averaged over dp ranks, expert loads summed."""
    from moespec.model.types import ModelAux, MoEStats

    losses = torch.stack([loss.detach().float(), ce.detach().float(), aux.aux_loss.detach().float()]).to(ctx.device)
    dist.all_reduce(losses, group=ctx.dp_group)
    losses = (losses / ctx.dp_size).cpu()
    stats = []
    for s in aux.moe:
        counts = s.tokens_per_expert_E.detach().to(ctx.device).clone()
        dropped = (s.dropped_fraction.detach().float() / ctx.dp_size).to(ctx.device)
        dist.all_reduce(counts, group=ctx.dp_group)
        dist.all_reduce(dropped, group=ctx.dp_group)
        stats.append(MoEStats(layer=s.layer, router=s.router, tokens_per_expert_E=counts.cpu(),
                              dropped_fraction=dropped.cpu(), losses=s.losses, a2a_bytes=s.a2a_bytes))
    return losses[0], losses[1], ModelAux(aux_loss=losses[2], moe=stats)


def build_optimizers(model: nn.Module, plan, ctx: DistContext | None, **adamw) -> list[torch.optim.Optimizer]:
    """AdamW, with the spec's ZeRO stage where torch provides it.

    zero_stage 1 shards the dense parameters' optimizer state over the dp ranks with torch's
    ZeroRedundancyOptimizer; expert state is already partitioned by expert parallelism (each
    rank holds E/ep experts) and stays with its experts. Stages 2 and 3 shard the dense
    parameters with FSDP2 (`wrap_data_parallel`), so a plain AdamW holds sharded state.
    """
    stage = plan.parallel.zero_stage
    if ctx is None or ctx.dp_size == 1 or stage == 0:
        return [torch.optim.AdamW(model.parameters(), **adamw)]
    if stage > 1:  # FSDP2 already shards the dense parameters, so their optimizer state too
        return [torch.optim.AdamW(model.parameters(), **adamw)]
    from torch.distributed.optim import ZeroRedundancyOptimizer

    expert_names = set(expert_parameter_names(model))
    dense = [p for name, p in model.named_parameters() if name not in expert_names]
    experts = [p for name, p in model.named_parameters() if name in expert_names]
    sharded = ZeroRedundancyOptimizer(dense, optimizer_class=torch.optim.AdamW, process_group=ctx.dp_group, **adamw)
    return [sharded] + ([torch.optim.AdamW(experts, **adamw)] if experts else [])
