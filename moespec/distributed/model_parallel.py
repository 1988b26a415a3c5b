"""Gradients of a model split by tensor or pipeline parallelism (tp or pp > 1), where DDP is
not used: one coalesced all-reduce per step over the dp ranks of the rank's (pp, tp)
position reduces the dense gradients after the schedule or the accumulation ran (DDP's
bucket overlap is given up: its reducer does not take DTensor parameters, and pipelining
would run one reduction per micro-batch backward). Expert gradients go over their edp group
as everywhere else (`data_parallel.reduce_expert_gradients`).

The global gradient norm for clipping counts every element once:
- a tensor-parallel shard (a DTensor over the tp mesh): local squares summed over tp;
  a replicated DTensor (a sequence-parallel norm's weight) counts as whole;
- an expert bank (each rank of an EP group holds others): summed over the EP group;
- anything else is whole and replicated over tp: local squares;
- each pipeline rank holds other blocks: the sum of the above over pp. A tied embedding held
  by the first and the last stage is counted on the first only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moespec.distributed.data_parallel import all_reduce_buckets, expert_parameter_names


def is_model_parallel(ctx) -> bool:
    return ctx is not None and (ctx.tp_size > 1 or ctx.pp_size > 1)


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad._local_tensor if isinstance(grad, DTensor) else grad


def reduce_dense_gradients(model: nn.Module, ctx) -> None:
    """Average the non-expert gradients over the dp ranks (in buckets, `all_reduce_buckets`)."""
    if ctx.dp_size == 1:
        return
    experts = set(expert_parameter_names(model))
    grads = [_local(p.grad) for name, p in model.named_parameters() if name not in experts and p.grad is not None]
    if not grads:
        return
    all_reduce_buckets(grads, ctx.dp_group)
    for g in grads:
        g.div_(ctx.dp_size)


def sync_gradients(setup) -> None:
    """After a step's backward: tied embedding copies summed, dense gradients averaged over
    dp, expert gradients over their edp group (no clipping)."""
    from moespec.distributed.data_parallel import reduce_expert_gradients
    from moespec.distributed.pipeline import sum_tied_embedding_grads

    if setup.pipeline is not None:
        sum_tied_embedding_grads(setup.pipeline.modules, setup.dist_ctx)
    if setup.dist_ctx.tp_size > 1:  # sequence-parallel norms' weights: partial sums over tp
        from moespec.distributed.tensor_parallel import reduce_partial_gradients

        reduce_partial_gradients(setup.bare_model, setup.dist_ctx.tp_mesh.get_group())
    reduce_dense_gradients(setup.bare_model, setup.dist_ctx)
    reduce_expert_gradients(setup.bare_model, setup.dist_ctx)


def clip_grad_norm_model_parallel(model: nn.Module, max_norm: float, ctx, *, skip: set[str] = frozenset()) -> torch.Tensor:
    """Clip by the whole model's gradient norm (module docstring). `skip`: parameter names
    whose gradient is a copy counted on another rank (the last stage's tied embedding)."""
    experts = set(expert_parameter_names(model))
    whole, sharded, expert = (torch.zeros((), dtype=torch.float32, device=ctx.device) for _ in range(3))
    params = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        params.append(p)
        if name in skip:
            continue
        square = _local(p.grad.detach()).float().pow(2).sum()
        if isinstance(p.grad, DTensor) and not all(pl.is_replicate() for pl in p.grad.placements):
            sharded += square
        elif name in experts:
            expert += square
        else:
            whole += square
    if ctx.tp_size > 1:
        dist.all_reduce(sharded, group=ctx.tp_mesh.get_group())
    if ctx.ep_size > 1:
        dist.all_reduce(expert, group=ctx.ep_group)
    total = whole + sharded + expert
    if ctx.pp_size > 1:
        dist.all_reduce(total, group=ctx.pp_group)
    norm = total.sqrt()
    scale = float((max_norm / (norm + 1e-6)).clamp(max=1.0))
    for p in params:
        p.grad.mul_(scale)
    return norm.cpu()


def tied_copies(pipeline) -> set[str]:
    """Names (in the pipeline's container) of tied embedding copies that are not the first stage's."""
    if pipeline is None:
        return set()
    return {f"{i}.tok_embeddings.weight" for i, module in enumerate(pipeline.modules)
            if not module.first and hasattr(module, "tok_embeddings")}  # fmt: skip
