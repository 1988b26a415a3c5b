"""Data parallel with expert parallelism inside it (REFERENCE.md sec. 3).

Every rank builds the full model from the same seed (identical init, as a single-process run
would have), then keeps only its E/ep experts. Dense parameters are averaged over all dp
ranks by torch's DDP; expert parameters are excluded from DDP and reduced over exactly their
expert-data-parallel group. Why the expert gradient is divided by dp, not by the edp size:
after the backward all-to-all, a rank's expert gradient already sums the contributions of
every rank in its EP group (sum_r dL_r/dw over the group); summing over the edp replicas
gives the sum over all dp ranks, and the global loss is the mean of the dp ranks' losses.

ZeRO stages (REFERENCE.md sec. 3; each kind of state sharded over the group that reduces its
gradients, in the chunks `zero.py` defines):
- 0: DDP for dense, the edp all-reduce for experts; whole params, grads and AdamW state.
- 1: as 0 for params and grads; AdamW state for this rank's chunks only (`zero.ZeroAdamW`).
- 2, 3: FSDP2 (`shard_fully`): params, grads and AdamW state at rest are the chunks; stage 3
  also frees the gathered parameters after forward.
"""

from __future__ import annotations

import re
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
        if layer.expert_parallel is not None:  # sharded already: applying the layout twice is once
            continue
        layer.shard_experts(ExpertParallel(group=ctx.ep_group, rank=ctx.ep_rank, size=ctx.ep_size))


def expert_parameter_names(model: nn.Module) -> list[str]:
    from moespec.model.experts import ExpertBank

    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertBank):
            names += [f"{module_name}.{name}" for name, _ in module.named_parameters()]
    return names


def wrap_data_parallel(model: nn.Module, ctx: DistContext, *, zero_stage: int = 0) -> nn.Module:
    """Data parallel as the ZeRO stage says (REFERENCE.md sec. 3).

    Stages 0 and 1: DDP over the dp ranks for the dense parameters; expert parameters are left
    out and reduced over their edp group (`reduce_expert_gradients`); stage 1 partitions the
    optimizer state in `build_optimizers`. Stages 2 and 3: FSDP2 (`shard_fully`), which shards
    parameters, gradients and (through them) optimizer state at rest."""
    if ctx.dp_size == 1:
        return model
    if zero_stage >= 2:
        return shard_fully(model, ctx, reshard_after_forward=zero_stage >= 3)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    with warnings.catch_warnings():
        # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, whose False still
        # syncs at init; we want neither, and the old spelling says exactly that.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(
            model,
            process_group=ctx.dp_group,
            broadcast_buffers=False,  # router bias buffers are kept equal by their own all-reduce
            # The reducer keeps a flat bucket of every dense gradient for the whole run; as
            # views of it, the gradients are not a second copy (h12: 29 MiB less per rank).
            gradient_as_bucket_view=True,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        )


EXPERT_FORWARD_METHODS = ("forward_capacity", "forward_grouped", "forward_dropless")  # ExpertBank's entry points


def shard_fully(model: nn.Module, ctx: DistContext, *, reshard_after_forward: bool) -> nn.Module:
    """FSDP2 `fully_shard`, torchtitan's layout: every ExpertBank over the edp mesh dimension
    (only when edp > 1; otherwise its experts stay whole on their rank and are reduced by
    `reduce_expert_gradients`), every decoder block over the dp ranks, then the root model.

    Dense parameters are Shard(0) (FSDP2's default) over dp; expert banks Shard(0) over edp, or
    Shard(1) when a rank holds fewer experts than there are replicas (`zero.expert_shard_dim`,
    torchtitan's placement). At rest a rank holds those chunks of parameters, gradients and
    AdamW state, the same chunks ZeRO-1 keeps state for (`zero.py`). FSDP2 divides a reduced gradient by its mesh size; an expert gradient must
    be summed over edp and divided by dp (module docstring), hence the divide factor dp. The
    banks are called through methods other than `forward`, which FSDP2 is told about
    (`register_fsdp_forward_method`) so that it all-gathers the bank around each of them.
    `reshard_after_forward` False (stage 2) keeps the gathered parameters from forward to
    backward; True (stage 3) frees them after forward and gathers them again in backward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import Shard

    from moespec.distributed.zero import expert_shard_dim
    from moespec.model.experts import ExpertBank

    dp_mesh = ctx.mesh._flatten("dp")  # all dp ranks, from the same ("edp", "ep") mesh
    expert_params: list[nn.Parameter] = []
    for block in getattr(model, "blocks", []):
        banks = [module for module in block.modules() if isinstance(module, ExpertBank)]
        ignored = set()
        for bank in banks:
            if ctx.edp_size > 1:
                placement = Shard(expert_shard_dim(bank.n_experts, ctx.edp_size))
                fully_shard(bank, mesh=ctx.mesh["edp"], reshard_after_forward=reshard_after_forward,
                            shard_placement_fn=lambda param, placement=placement: placement)  # fmt: skip
                bank.set_gradient_divide_factor(float(ctx.dp_size))
                if ctx.backend == "gloo":  # a custom factor is NCCL's PREMUL_SUM, which gloo lacks
                    bank.set_force_sum_reduction_for_comms(True)
                for method in EXPERT_FORWARD_METHODS:
                    register_fsdp_forward_method(bank, method)
            else:
                ignored.update(bank.parameters())
        expert_params += ignored
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)
    return fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward,
                       ignored_params=set(expert_params) or None)  # fmt: skip


GRAD_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket (bucket_cap_mb=25)
GRAD_ALONE_BYTES = 2**20  # a gradient this large is reduced where it lies, in a call of its own
_BLOCK = re.compile(r"(?:^|\.)blocks\.\d+\.")  # a block's parameters (encoder and decoder; a pipeline stage's prefix before): a ZeRO-1 unit


def grad_buckets(nbytes: list[int], cap: int = GRAD_BUCKET_BYTES, alone: int = GRAD_ALONE_BYTES) -> list[list[int]]:
    """The indices of each bucket: a tensor of `alone` bytes or more on its own, the smaller
    ones packed greedily, consecutive, into buckets of at most `cap` bytes. Buckets amortise a
    call's latency over small tensors; a large one costs its bandwidth either way, and copying
    it flat (14 MB took 9-11 ms on the 2-core VM, page faults included, against ~1 ms a gloo
    call) costs more than its own call."""
    out, size, open_bucket = [], 0, False
    for i, n in enumerate(nbytes):
        if n >= alone:
            out.append([i])
            open_bucket = False
        elif open_bucket and size + n <= cap:
            out[-1].append(i)
            size += n
        else:
            out.append([i])
            size, open_bucket = n, True
    return out


def all_reduce_buckets(grads: list[torch.Tensor], group) -> None:
    """Sum gradients over `group` in place, bucket by bucket (`grad_buckets`): a bucket of one
    tensor is reduced where it lies, several (small ones) are copied into one flat tensor and
    back. Why: one flat copy of all of them (as before) held every expert gradient twice at
    the sync, 15 GiB of Mixtral's 85.8 GiB peak at dp 32 x ep 8; now an expert bank is reduced
    in place, and at most one bucket of small tensors is copied (sim/memory.py)."""
    for bucket in grad_buckets([g.numel() * g.element_size() for g in grads]):
        if len(bucket) == 1 and grads[bucket[0]].is_contiguous():
            dist.all_reduce(grads[bucket[0]], group=group)
            continue
        flat = torch.cat([grads[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat, group=group)
        offset = 0
        for i in bucket:
            grads[i].copy_(flat[offset : offset + grads[i].numel()].view_as(grads[i]))
            offset += grads[i].numel()
        del flat  # before the next bucket's copy is made


def reduce_expert_gradients(model: nn.Module, ctx: DistContext, *, average: bool = True) -> None:
    """Sum expert gradients over the edp group and divide by dp (see the module docstring).
    Gradients FSDP2 already reduced (DTensors, ZeRO-2/3 with edp > 1) are left alone.
    average=False leaves the division to `clip_grad_norm_distributed(expert_scale=1/dp)`,
    which folds it into the clip's one multiply: a pass over every expert gradient less."""
    names = set(expert_parameter_names(unwrap(model)))
    grads = [
        p.grad for name, p in unwrap(model).named_parameters()
        if name in names and p.grad is not None and not isinstance(p.grad, DTensor)
    ]  # fmt: skip
    if not grads:
        return
    if ctx.edp_size > 1:
        all_reduce_buckets(grads, ctx.edp_group)
    if average and ctx.dp_size > 1:
        torch._foreach_div_(grads, ctx.dp_size)


def unwrap(model: nn.Module) -> nn.Module:
    """The model without DDP's wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a scalar over the dp ranks (for reporting the global loss)."""
    value = value.detach().clone()
    if ctx.dp_size > 1:
        dist.all_reduce(value, group=ctx.dp_group)
    return value / ctx.dp_size


def clip_grad_norm_distributed(model: nn.Module, max_norm: float, ctx: DistContext, *, expert_scale: float = 1.0) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient, as one process would.

    Three kinds of gradient, each element counted once: whole dense gradients (equal on every
    rank after DDP: counted locally); whole expert gradients (each rank of an EP group holds
    other experts, equal over edp: squares summed over the EP group); FSDP2 shards (DTensors,
    dense over dp and experts over edp: every element lives on exactly one dp rank, whichever
    of the two meshes, so the local squares are summed over all dp ranks).

    expert_scale: a factor the whole expert gradients still need (1/dp, from
    `reduce_expert_gradients(average=False)`): their norm is taken as if applied, and it is
    applied in the same multiply as the clip. As torch's clip_grad_norm_ (which `calibrate`
    times): one foreach norm per kind (a read of each gradient, no temporary) and one foreach
    multiply, skipped when nothing changes. This replaced a pow, a sum and a device-to-host
    copy per tensor and a separate division of every expert gradient: 4 passes over the expert
    gradients where the simulator's optimizer term, measured on torch's clip, has 2."""
    names = set(expert_parameter_names(model))
    dense, experts, shards = [], [], []
    # Which all-reduces run is decided by the model's layout, the same on every rank.
    any_sharded = any(isinstance(p, DTensor) for p in model.parameters())
    whole_experts = any(name in names and not isinstance(p, DTensor) for name, p in model.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        (shards if isinstance(p.grad, DTensor) else experts if name in names else dense).append(p.grad)
    dense_sq = _sum_of_squares(dense, ctx.device)
    expert_sq = _sum_of_squares(experts, ctx.device) * expert_scale**2  # the norm of the mean
    sharded_sq = _sum_of_squares([g.to_local() for g in shards], ctx.device)
    if any_sharded:
        dist.all_reduce(sharded_sq, group=ctx.dp_group)
    if ctx.ep_size > 1 and whole_experts:
        dist.all_reduce(expert_sq, group=ctx.ep_group)
    total_norm = (dense_sq + expert_sq + sharded_sq).sqrt().cpu()
    scale = float((max_norm / (total_norm + 1e-6)).clamp(max=1.0))
    if scale != 1.0:
        if dense:
            torch._foreach_mul_(dense, scale)
        for g in shards:
            g.mul_(scale)
    if experts and scale * expert_scale != 1.0:
        torch._foreach_mul_(experts, scale * expert_scale)
    return total_norm


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """float32 sum of the tensors' squares, on `device` (where the all-reduce runs)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum().to(device)


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


def build_optimizers(model: nn.Module, plan, ctx: DistContext | None, **adamw) -> list:
    """AdamW, its state partitioned as the spec's ZeRO stage says (REFERENCE.md sec. 3).

    Stage 0 (or one dp rank): plain AdamW over this rank's parameters (dense + its experts).
    Stage 1: `ZeroAdamW`, state for the dim-0 chunk of each dense parameter over dp and of each
    expert bank over edp. Stages 2 and 3: FSDP2 already made the parameters Shard(0) DTensors
    (`shard_fully`), so AdamW's state is sharded with them; parameters FSDP2 left whole
    (experts when edp = 1) get their own AdamW, so that no optimizer mixes the two kinds.
    """
    stage = plan.parallel.zero_stage
    if ctx is None or ctx.dp_size == 1 or stage == 0:
        return [torch.optim.AdamW(model.parameters(), **adamw)]
    if stage >= 2:
        sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
        whole = [p for p in model.parameters() if not isinstance(p, DTensor)]
        return [torch.optim.AdamW(params, **adamw) for params in (sharded, whole) if params]
    from moespec.distributed.zero import ZeroAdamW, expert_shard_dim
    from moespec.model.experts import ExpertBank

    # One group per unit, as FSDP2's (`shard_fully`): each block's dense parameters, the
    # model's other dense parameters (embeddings, final norms, head), each expert bank. The
    # gather after the step then holds one unit at a time (zero.py) in a call per unit.
    groups, expert_ids = [], set()
    for bank in model.modules():
        if isinstance(bank, ExpertBank):
            params = list(bank.parameters())
            expert_ids.update(id(p) for p in params)
            groups.append((params, [expert_shard_dim(bank.n_experts, ctx.edp_size)] * len(params), ctx.edp_group))
    dense_units: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if id(param) not in expert_ids:
            block = _BLOCK.search(name)
            dense_units.setdefault(block.group(0) if block else "", []).append(param)
    groups = [(params, [0] * len(params), ctx.dp_group) for params in dense_units.values()] + groups
    return [ZeroAdamW(groups, **adamw)]

