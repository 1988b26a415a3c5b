"""ZeRO-1 for dense and expert parameters: AdamW state for this rank's dim-0 chunk only.

The convention (REFERENCE.md sec. 3, the one the cost model predicts): a parameter's "dim-0
chunk" over a group of W ranks is rows [r*c, min((r+1)*c, dim0)) of rank r, c = ceil(dim0 / W),
possibly none; this is exactly FSDP2's per-parameter Shard(0), so stages 1, 2 and 3 hold the
same chunks of whatever they shard. Dense parameters are chunked over the dp group, expert
banks ([e_local, D, F] and [e_local, F, D]) over the expert-data-parallel group.

`ZeroAdamW.step`, after gradients were reduced (DDP for dense, the edp all-reduce for experts,
as at stage 0), runs torch's AdamW on leaf views of this rank's chunks (`p.data[a:b]`, its
gradient `p.grad[a:b]`), so the update is AdamW's own arithmetic on the same numbers, element
by element; then one all-gather per group (the chunks of all its parameters packed into one
buffer, each padded to c rows) gives every rank the full parameters again. Parameters and
gradients stay whole on every rank; only the exp_avg and exp_avg_sq tensors are partitioned.

Why not torch's `ZeroRedundancyOptimizer`: it assigns whole parameters to ranks, greedily by
size, so the state a rank holds is uneven (the embedding's whole state lands on one rank) and
never a chunk of a parameter, and it cannot shard an expert bank over its edp group (a bank
is one parameter per projection). Neither is what the cost model counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def dim0_chunk(dim0: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of a dim0-row tensor that rank `rank` of `world` holds: chunks of
    ceil(dim0 / world) rows, the last ones short or empty (FSDP2's Shard(0))."""
    rows = -(-dim0 // world)
    return min(rank * rows, dim0), min((rank + 1) * rows, dim0)


def _rows(param: torch.Tensor) -> torch.Tensor:
    """The parameter's data as rows along dim 0 (a 0-d parameter is one row)."""
    return param.data if param.dim() else param.data.view(1)


@dataclass
class ShardedGroup:
    """Parameters chunked over one process group (dense over dp, experts over edp)."""

    params: list[nn.Parameter]
    group: object  # ProcessGroup, or None for the default group
    rank: int
    world: int

    def chunk(self, param: torch.Tensor, rank: int | None = None) -> tuple[int, int]:
        return dim0_chunk(_rows(param).shape[0], self.rank if rank is None else rank, self.world)

    @torch.no_grad()
    def all_gather(self) -> None:
        """Every rank's updated chunks to every rank: one padded all-gather per dtype."""
        if self.world == 1:
            return
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for param in self.params:
            by_dtype.setdefault(param.dtype, []).append(param)
        for params in by_dtype.values():
            # Each parameter occupies c rows (c = ceil(dim0 / W)) of every rank's segment.
            sizes = [-(-_rows(p).shape[0] // self.world) * _rows(p)[0:1].numel() for p in params]
            segment = sum(sizes)
            send = params[0].new_zeros(segment)
            offset = 0
            for param, size in zip(params, sizes):
                start, stop = self.chunk(param)
                mine = _rows(param)[start:stop].reshape(-1)
                send[offset : offset + mine.numel()] = mine
                offset += size
            received = send.new_empty(self.world * segment)
            _all_gather_single(received, send, group=self.group)
            for rank in range(self.world):
                offset = rank * segment
                for param, size in zip(params, sizes):
                    start, stop = self.chunk(param, rank)
                    if stop > start:
                        rows = _rows(param)[start:stop]
                        rows.copy_(received[offset : offset + rows.numel()].view_as(rows))
                    offset += size


def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, *, group) -> None:
    """dist.all_gather_single (torch 2.13's name) or all_gather_into_tensor (older)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


class ZeroAdamW:
    """AdamW whose state covers this rank's dim-0 chunk of every parameter (ZeRO stage 1).

    groups: (parameters, process group) pairs; each parameter is chunked over its group.
    `param_groups` lists the whole parameters (GradScaler unscales their whole gradients);
    `state` is the inner AdamW's, keyed by the chunk views, with only this rank's chunks.
    """

    def __init__(self, groups: list[tuple[list[nn.Parameter], object]], **adamw):
        self.groups = [
            ShardedGroup(list(params), group, dist.get_rank(group), dist.get_world_size(group))
            for params, group in groups
            if params
        ]
        self._views: list[tuple[nn.Parameter, torch.Tensor, int, int]] = []  # (param, chunk view, start, stop)
        for sharded in self.groups:
            for param in sharded.params:
                start, stop = sharded.chunk(param)
                if stop > start:
                    self._views.append((param, _rows(param)[start:stop], start, stop))
        views = [view for _, view, _, _ in self._views]
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
        for param, view, start, stop in self._views:
            view.grad = None if param.grad is None else (param.grad if param.dim() else param.grad.view(1))[start:stop]
        self.inner.step()
        for _, view, _, _ in self._views:
            view.grad = None  # a view of the gradient: do not keep it alive past zero_grad
        for sharded in self.groups:
            sharded.all_gather()
