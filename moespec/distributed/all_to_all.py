"""`all_to_all_single` with autograd and a byte counter.

torch.distributed.nn.functional has an autograd all-to-all, but it cannot report what it
sent; the profiler and the simulator compare exactly that figure (REFERENCE.md sec. 4: bytes a
rank sends to other ranks, its own chunk excluded, forward and backward), so we count it here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moespec.model.regions import region


@dataclass
class A2ACounter:
    """Bytes this rank sent to other ranks through counted all-to-alls (own chunk excluded)."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    calls: int = 0

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes

    def reset(self) -> None:
        self.forward_bytes = self.backward_bytes = self.calls = 0


def bytes_to_others(split_sizes: list[int], my_rank: int, row_bytes: int) -> int:
    return sum(rows for rank, rows in enumerate(split_sizes) if rank != my_rank) * row_bytes


class _CountedAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group, counter, label):
        ctx.output_splits, ctx.input_splits, ctx.group, ctx.counter = output_splits, input_splits, group, counter
        ctx.label = label
        rank = dist.get_rank(group)
        row_bytes = x_ND[0:1].numel() * x_ND.element_size() if x_ND.dim() > 1 else x_ND.element_size()
        ctx.row_bytes = row_bytes
        counter.forward_bytes += bytes_to_others(input_splits, rank, row_bytes)
        counter.calls += 1
        out_MD = x_ND.new_empty((sum(output_splits), *x_ND.shape[1:]))
        with region(label):
            dist.all_to_all_single(out_MD, x_ND.contiguous(), output_splits, input_splits, group=group)
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD):
        rank = dist.get_rank(ctx.group)
        ctx.counter.backward_bytes += bytes_to_others(ctx.output_splits, rank, ctx.row_bytes)
        ctx.counter.calls += 1
        grad_ND = grad_MD.new_empty((sum(ctx.input_splits), *grad_MD.shape[1:]))
        with region(ctx.label):  # the backward of a dispatch is still the dispatch's traffic
            dist.all_to_all_single(grad_ND, grad_MD.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_ND, None, None, None, None, None


def all_to_all(
    x_ND: torch.Tensor, *, output_splits: list[int], input_splits: list[int], group, counter: A2ACounter,
    label: str = "a2a",
) -> torch.Tensor:
    """Rows [N, ...] split by input_splits go to each rank; returns the rows received, [sum(output_splits), ...]."""
    return _CountedAllToAll.apply(x_ND, list(output_splits), list(input_splits), group, counter, label)
