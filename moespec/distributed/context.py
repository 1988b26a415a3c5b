"""Process groups from the plan (REFERENCE.md sec. 3).

world = pp * tp * dp; expert parallelism lives inside data parallelism. Ranks are laid out
on a DeviceMesh of shape (pp, dp / ep, ep, tp) named ("pp", "edp", "ep", "tp"), built once
here (Megatron's order: tp innermost, then ep, then the expert replicas, pp outermost): a
tensor-parallel group is tp consecutive ranks, an expert-parallel group ep ranks tp apart
(so both stay inside a node when tp * ep <= GPUs per node), and the ranks that hold the same
experts form an expert-data-parallel ("edp") group. Dense parameters are reduced over the
dp ranks of their (pp, tp) position, expert parameters over their edp group. With tp = pp = 1
the mesh is the 2-D ("edp", "ep") one the data-parallel code has always used.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moespec.spec.plan import SpecPlan


class DistributedConfigError(ValueError):
    """The launch does not fit the spec (world size, unsupported degree): a user error, exit 2."""


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    dp_group: object  # all data-parallel ranks (dense gradients)
    dp_size: int
    ep_group: object  # ranks sharing one set of E experts (all-to-all)
    ep_rank: int
    ep_size: int
    edp_group: object  # ranks holding the same experts (expert gradients)
    edp_size: int
    mesh: object
    dp_rank: int = 0  # index among the dp ranks: which batches this rank draws
    tp_size: int = 1
    tp_mesh: object = None  # 1-D DeviceMesh of this rank's tp group (DTensor's parallelize_module)
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: object = None
    embedding_group: object = None  # first and last pipeline stage, when both hold a tied embedding


def launched_world() -> int | None:
    """WORLD_SIZE when started by torchrun (or `moespec ... --nproc`), else None."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world else None


def check_executable(plan: SpecPlan, dist_ctx: "DistContext | None" = None) -> None:
    """tp or pp > 1 split the model over ranks: they run only under a process group (what
    cannot run split at all is refused at validation, spec/resolve.py)."""
    p = plan.parallel
    if (p.tp > 1 or p.pp > 1) and dist_ctx is None:
        raise DistributedConfigError(
            f"parallelism.tp ({p.tp}) and parallelism.pp ({p.pp}) split the model over ranks; launch --nproc {p.world} "
            "(one process runs only the data-parallel math, with tp = pp = 1)"
        )


def check_world(plan: SpecPlan, world: int) -> None:
    p = plan.parallel
    if world != p.world:
        fix = f"use --nproc {p.world}" if p.world <= 64 else f"launch {p.world:,} ranks over nodes (--nproc per node x --nnodes)"
        dp = world // (p.pp * p.tp)
        fix += f" or set parallelism.dp to {dp}" if dp >= 1 and dp * p.pp * p.tp == world else f" or lower parallelism.dp, tp or pp to fit {world} ranks"
        raise DistributedConfigError(
            f"the spec needs world = pp * tp * dp = {p.pp} * {p.tp} * {p.dp} = {p.world} ranks but {world} were launched; {fix}"
        )


def check_single_process(plan: SpecPlan, *, single_process: bool = False) -> None:
    """Refuse to run `plan` in one process unless it fits: tp = pp = 1, and world 1 or the
    explicit `--single-process` (the data-parallel math of all ranks in one process)."""
    check_executable(plan)
    if single_process:
        return
    try:
        check_world(plan, 1)
    except DistributedConfigError as exc:
        raise DistributedConfigError(f"{exc}; or pass --single-process to run its data-parallel math in one process") from None


def micro_batches_per_step(plan: SpecPlan, dist_ctx: "DistContext | None") -> int:
    """Micro-batches one process runs per optimizer step, so that a step is global_batch
    sequences (at micro_batch each): grad_accum on each of dp ranks, or global_batch /
    micro_batch in one process (the data-parallel math of all dp ranks, same routing groups)."""
    p = plan.parallel
    return p.global_batch // (p.micro_batch * (1 if dist_ctx is None else dist_ctx.dp_size))


def single_process_plan(plan: SpecPlan) -> SpecPlan:
    """The plan a single process runs for a spec of world dp (`--single-process`): dp 1, the
    same global_batch (so global_batch / micro_batch micro-batches per step), no expert
    parallelism and no ZeRO, which need ranks."""
    parallel = dataclasses.replace(plan.parallel, dp=1, ep=1, zero_stage=0)
    return dataclasses.replace(plan, parallel=parallel)


def single_process_note(plan: SpecPlan, micro_batch: int | None = None) -> str:
    """One line saying what `--single-process` runs for this (original) plan."""
    p = plan.parallel
    return (f"single process: the data-parallel math of dp {p.dp} as {p.global_batch // p.micro_batch} micro-batches of "
            f"{micro_batch or p.micro_batch} sequences per step; parallelism.ep ({p.ep}) and zero_stage ({p.zero_stage}) "
            "do not apply")  # fmt: skip


def init_distributed(plan: SpecPlan, *, timeout_s: float = 120.0, device: str = "auto") -> DistContext:
    """Join the process group torchrun set up (env://) and build the mesh for this plan."""
    world = launched_world() or 1
    check_world(plan, world)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    p = plan.parallel
    common = dict(rank=rank, world=world, local_rank=local_rank, device=torch_device, backend=backend, dp_size=p.dp,
                  ep_size=p.ep, edp_size=p.dp // p.ep)  # fmt: skip
    if p.tp > 1 or p.pp > 1:
        return _model_parallel_context(plan, common)
    mesh = init_device_mesh(torch_device.type, (p.dp // p.ep, p.ep), mesh_dim_names=("edp", "ep"))
    return DistContext(**common, dp_group=dist.group.WORLD, dp_rank=rank, **_expert_groups(mesh))


def _expert_groups(mesh) -> dict:
    """The expert-parallel and expert-data-parallel groups of a mesh with "ep" and "edp" dims."""
    return dict(ep_group=mesh.get_group("ep"), ep_rank=mesh.get_local_rank("ep"), edp_group=mesh.get_group("edp"), mesh=mesh)


def _model_parallel_context(plan: SpecPlan, common: dict) -> DistContext:
    """The 4-D mesh (pp, edp, ep, tp) and its groups (module docstring)."""
    p = plan.parallel
    mesh = init_device_mesh(common["device"].type, (p.pp, p.dp // p.ep, p.ep, p.tp), mesh_dim_names=("pp", "edp", "ep", "tp"))
    dp_mesh = mesh["edp", "ep"]._flatten("dp")
    embedding_group = None
    if p.pp > 1 and plan.model.tied_embeddings:
        # every rank creates every pair's group, in the same order (new_group is collective)
        ranks = mesh.mesh.reshape(p.pp, -1)  # [pp, dp * tp]
        for column in range(ranks.shape[1]):
            pair = [int(ranks[0, column]), int(ranks[-1, column])]
            group = dist.new_group(pair)
            if common["rank"] in pair:
                embedding_group = group
    return DistContext(
        **common, **_expert_groups(mesh), dp_group=dp_mesh.get_group(), dp_rank=dp_mesh.get_local_rank(),
        tp_size=p.tp, tp_mesh=mesh["tp"], pp_size=p.pp, pp_rank=mesh.get_local_rank("pp"), pp_group=mesh.get_group("pp"),
        embedding_group=embedding_group,
    )  # fmt: skip


def shutdown() -> None:
    """Leave together, then tear the groups down: a rank that destroys its groups (and exits)
    while a peer still has collectives of the same groups in flight was seen, once in seven
    tensor-parallel profiles, to end in gloo's std::terminate."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
