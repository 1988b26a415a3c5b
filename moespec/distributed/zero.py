"""ZeRO-1 for dense and expert parameters: AdamW state for this rank's chunk only.

The convention (REFERENCE.md sec. 3, the one the cost model predicts, sim/counts.py): a
parameter's chunk along dim d over a group of W ranks is indices [r*c, min((r+1)*c, size_d))
of rank r, c = ceil(size_d / W), possibly none; this is exactly FSDP2's per-parameter
Shard(d), so stages 1, 2 and 3 hold the same chunks of whatever they shard.
- Dense parameters: dim 0 over the dp group.
- Expert banks (w_gate/w_up [e_local, D, F], w_down [e_local, F, D]) over the
  expert-data-parallel group: by expert (dim 0), unless the rank holds fewer experts than
  there are replicas (e_local < edp), then by their second dim (D, or F for w_down), which
  is torchtitan's placement (dim-0 chunks would leave replicas empty). `expert_shard_dim`.

`ZeroAdamW.step`, after gradients were reduced (DDP for dense, the edp all-reduce for experts,
as at stage 0), runs torch's AdamW on leaf views of this rank's chunks (`p.data.narrow(...)`,
its gradient the same view of `p.grad`), so the update is AdamW's own arithmetic on the same
numbers, element by element; then one all-gather per unit (a block's dense parameters, the
model's other dense parameters, each expert bank: FSDP2's units; each chunk padded to c
slices) gives every rank the full parameters again.
Parameters and gradients stay whole on every rank; only exp_avg and exp_avg_sq are partitioned.

Why not torch's `ZeroRedundancyOptimizer`: it assigns whole parameters to ranks, greedily by
size, so the state a rank holds is uneven (the embedding's whole state lands on one rank) and
never a chunk of a parameter, and it cannot shard an expert bank over its edp group (a bank
is one parameter per projection). Neither is what the cost model counts.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def chunk_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """Indices [start, stop) of a dimension of `size` that rank `rank` of `world` holds:
    chunks of ceil(size / world), the last ones short or empty (FSDP2's Shard(d))."""
    per_rank = -(-size // world)
    return min(rank * per_rank, size), min((rank + 1) * per_rank, size)


def expert_shard_dim(n_local_experts: int, replicas: int) -> int:
    """The dim an expert bank is sharded along over its `replicas` (edp) ranks: 0 (by expert),
    or 1 when there are fewer local experts than replicas (torchtitan's placement)."""
    return 1 if replicas > n_local_experts else 0


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor as one row, others as they are."""
    return tensor if tensor.dim() else tensor.view(1)


@dataclass
class ShardedGroup:
    """Parameters chunked over one process group (dense over dp, experts over edp), each
    along its own dim."""

    params: list[nn.Parameter]
    dims: list[int]  # the dim each parameter is chunked along
    group: object  # ProcessGroup, or None for the default group
    rank: int
    world: int

    def chunk(self, i: int, rank: int | None = None) -> torch.Tensor:
        """The view of parameter i's data that `rank` (default: this rank) holds."""
        data, dim = _as_rows(self.params[i].data), self.dims[i]
        start, stop = chunk_range(data.shape[dim], self.rank if rank is None else rank, self.world)
        return data.narrow(dim, start, stop - start)

    def segment(self, i: int) -> int:
        """Elements parameter i takes in every rank's share: ceil(size_d / W) slices of
        (numel / size_d), whatever this rank's own chunk holds (the last ones are short)."""
        data, dim = _as_rows(self.params[i].data), self.dims[i]
        return -(-data.shape[dim] // self.world) * (data.numel() // max(data.shape[dim], 1))

    @functools.cached_property
    def segments(self) -> dict[torch.dtype, tuple[list[int], list[int], int]]:
        """Per dtype: the parameters' indices, their segments and the sum (one rank's share).
        Shapes only: worked out once, not at each step's gather."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, param in enumerate(self.params):
            by_dtype.setdefault(param.dtype, []).append(i)
        segments = {}
        for dtype, indices in by_dtype.items():
            sizes = [self.segment(i) for i in indices]
            segments[dtype] = (indices, sizes, sum(sizes))
        return segments

    @torch.no_grad()
    def all_gather(self, send_buffers: dict[torch.dtype, torch.Tensor] | None = None) -> None:
        """Every rank's updated chunks to every rank: one padded all-gather per dtype (one in
        all: the parameters are float32 at every precision), the chunks of all the group's
        parameters packed into one buffer. The optimizer makes one group per unit (a block's
        dense parameters, the rest, each expert bank: `build_optimizers`), so the transient is
        one unit's chunks and their gathered copy, not every parameter's (26 GiB per rank at
        Mixtral's size, dp 32 x ep 8, when a group held all of them), in a call per unit.
        Two copies per element: mine into the send buffer, the others' out of the received
        one (not zero-filling the send buffer, not copying mine back onto itself: at world 2
        those were half the gather's memory traffic).

        send_buffers (per dtype, at least this group's segment): the send buffer, shared by all
        of a step's groups (`ZeroAdamW.step`). Why: gloo's worker thread keeps a finished
        collective's input until it next takes its queue lock, so a send buffer freed after
        the call could still be alive when the next group allocated its own: a peak 12 MiB
        above the simulator's in about one run in four (tests/test_profile_memory.py). A
        shared one is the same memory whoever holds it last."""
        if self.world == 1:
            return
        for dtype, (indices, sizes, segment) in self.segments.items():
            if send_buffers is not None and dtype in send_buffers:
                send = send_buffers[dtype][:segment]
            else:
                send = self.params[indices[0]].new_empty(segment)  # a short chunk's padding is sent but never read
            offset = 0
            for i, size in zip(indices, sizes):
                mine = self.chunk(i).reshape(-1)
                send[offset : offset + mine.numel()] = mine
                offset += size
            received = send.new_empty(self.world * segment)
            _all_gather_single(received, send, group=self.group)
            del send
            for rank in range(self.world):
                if rank == self.rank:  # my chunks are already in place
                    continue
                offset = rank * segment
                for i, size in zip(indices, sizes):
                    part = self.chunk(i, rank)
                    part.copy_(received[offset : offset + part.numel()].view(part.shape))
                    offset += size
            del received


def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, *, group) -> None:
    """dist.all_gather_single (torch 2.13's name) or all_gather_into_tensor (older)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


class ZeroAdamW:
    """AdamW whose state covers this rank's dim-0 chunk of every parameter (ZeRO stage 1).

    groups: (parameters, their chunk dims, process group); each parameter is chunked over its
    group, and each group is gathered in one call after the step (`build_optimizers` makes
    one per unit).
    `param_groups` lists the whole parameters (GradScaler unscales their whole gradients);
    `state` is the inner AdamW's, keyed by the chunk views, with only this rank's chunks.
    """

    def __init__(self, groups: list[tuple[list[nn.Parameter], list[int], object]], **adamw):
        self.groups = [
            ShardedGroup(list(params), list(dims), group, dist.get_rank(group), dist.get_world_size(group))
            for params, dims, group in groups
            if params
        ]
        self._views: list[tuple[nn.Parameter, torch.Tensor, int, int, int]] = []  # (param, view, dim, start, length)
        for sharded in self.groups:
            for i, param in enumerate(sharded.params):
                view = sharded.chunk(i)
                if view.numel():
                    dim = sharded.dims[i]
                    start = chunk_range(_as_rows(param.data).shape[dim], sharded.rank, sharded.world)[0]
                    self._views.append((param, view, dim, start, view.shape[dim]))
        views = [view for _, view, _, _, _ in self._views]
        # An empty parameter list is refused by torch.optim; a rank may hold no chunk at all.
        self.inner = torch.optim.AdamW(views or [torch.zeros(0)], **adamw)
        self.defaults = self.inner.defaults

    @property
    def param_groups(self) -> list[dict]:
        hyper = {key: value for key, value in self.inner.param_groups[0].items() if key != "params"}
        return [{**hyper, "params": [p for sharded in self.groups for p in sharded.params]}]

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for sharded in self.groups:
            for param in sharded.params:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure=None):
        """AdamW on my chunks (gradients already reduced), then all-gather the parameters."""
        if closure is not None:
            raise ValueError("ZeroAdamW.step takes no closure")
        for param, view, dim, start, length in self._views:
            view.grad = None if param.grad is None else _as_rows(param.grad).narrow(dim, start, length)
        self.inner.step()
        for _, view, _, _, _ in self._views:
            view.grad = None  # a view of the gradient: do not keep it alive past zero_grad
        longest: dict[torch.dtype, tuple[int, torch.Tensor]] = {}  # one send buffer per dtype for all groups
        for sharded in self.groups:
            if sharded.world > 1:
                for dtype, (indices, _, segment) in sharded.segments.items():
                    if segment > longest.get(dtype, (-1, None))[0]:
                        longest[dtype] = (segment, sharded.params[indices[0]])
        send_buffers = {dtype: param.new_empty(segment) for dtype, (segment, param) in longest.items()}
        for sharded in self.groups:
            sharded.all_gather(send_buffers)
        del send_buffers
