"""Expert parallelism: each rank of a P-rank group holds E/P experts (L local experts).

The MoE layer computes its routing plan as usual (`plan_dispatch`, global expert ids) and
hands the expert computation to one of the two exchanges here:

- capacity: the fixed [E, C, D] buffer is split by owner, [P, L*C, D]; one even all-to-all
  gives every rank [P, L, C, D] (its L experts' slots from every source); it runs its experts on
  [L, P*C, D] and a second all-to-all sends the results back. Sizes are fixed, so no host sync.
- dropless: rows sorted by global expert; first the per-expert counts are exchanged (an
  all-to-all of E integers), then the rows with uneven splits. Received rows arrive ordered
  by (source rank, local expert); `regroup_by_local_expert` reorders them by (local expert,
  source) so each local expert's rows are contiguous for the grouped matmul, and its inverse
  puts the results back before the return all-to-all.
- BASE's token shuffle (`shuffle_routes`, `shuffle_tokens`, `unshuffle_tokens`): before
  routing, every rank sends exactly T/P of its tokens, chosen at random by a generator every
  rank seeds alike, to every rank of the group, and the results come back the same way.

Rows travel in the compute dtype (the MoE layer casts them before it builds what is sent), so
under bf16/fp16 autocast every counted all-to-all moves 2-byte elements, under fp32 4-byte.
The index math is pure functions of counts, tested without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moespec.distributed.all_to_all import A2ACounter, all_to_all
from moespec.model.regions import region


@dataclass
class ExpertParallel:
    """What a MoE layer needs to run expert-parallel: a runtime object, never a spec field."""

    group: object  # torch.distributed ProcessGroup of the P ranks sharing one set of E experts
    rank: int  # this rank's index inside the group: it owns experts [rank*L, (rank+1)*L)
    size: int  # P
    counter: A2ACounter = field(default_factory=A2ACounter)  # dispatch + combine (what REFERENCE counts)
    shuffle_counter: A2ACounter = field(default_factory=A2ACounter)  # BASE token shuffle, reported apart


def regroup_by_local_expert(recv_counts_PL: torch.Tensor) -> torch.Tensor:
    """Permutation taking rows ordered by (source p, local expert l) to (l, p) order. [N] long.

    recv_counts_PL[p, l]: rows source p sent for local expert l.
    """
    n_sources, n_local = recv_counts_PL.shape
    device = recv_counts_PL.device
    # Key of each (p, l) block in arrival (p-major) order: l * P + p sorts blocks by expert.
    block_key_PL = torch.arange(n_local, device=device)[None, :] * n_sources + torch.arange(n_sources, device=device)[:, None]
    row_key_N = block_key_PL.flatten().repeat_interleave(recv_counts_PL.flatten())
    return torch.argsort(row_key_N, stable=True)


def capacity_exchange(x_ECD: torch.Tensor, experts_local, ep: ExpertParallel) -> torch.Tensor:
    """Run the fixed capacity buffer through the experts of the whole group. [E, C, D] -> [E, C, D]."""
    n_experts, capacity, d_model = x_ECD.shape
    n_local = n_experts // ep.size
    rows_per_rank = n_local * capacity
    splits = [rows_per_rank] * ep.size
    send_ND = x_ECD.reshape(n_experts * capacity, d_model)  # owner-major: rank p's experts are rows p*L*C...
    recv_ND = all_to_all(send_ND, output_splits=splits, input_splits=splits, group=ep.group, counter=ep.counter,
                         label="dispatch_a2a")  # fmt: skip
    # [P, L, C, D] from each source -> [L, P*C, D]: each local expert sees its slots from every source.
    recv_LXD = recv_ND.view(ep.size, n_local, capacity, d_model).transpose(0, 1).reshape(n_local, ep.size * capacity, d_model)
    with region("experts"):
        out_LXD = experts_local.forward_capacity(recv_LXD)
    back_ND = out_LXD.view(n_local, ep.size, capacity, d_model).transpose(0, 1).reshape(ep.size * rows_per_rank, d_model)
    out_ND = all_to_all(back_ND, output_splits=splits, input_splits=splits, group=ep.group, counter=ep.counter,
                        label="combine_a2a")  # fmt: skip
    return out_ND.view(n_experts, capacity, d_model)


def dropless_exchange(x_AD: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts_local, ep: ExpertParallel) -> torch.Tensor:
    """Rows sorted by global expert through the group's experts and back, in the same order. [A, D]."""
    n_experts = tokens_per_expert_E.shape[0]
    n_local = n_experts // ep.size
    # 1. Tell each owner how many rows of each of its experts are coming (E small integers).
    recv_counts_flat = torch.empty_like(tokens_per_expert_E)
    with region("dispatch_a2a"):
        dist.all_to_all_single(recv_counts_flat, tokens_per_expert_E.contiguous(), group=ep.group)
    recv_counts_PL = recv_counts_flat.view(ep.size, n_local)
    send_splits = tokens_per_expert_E.view(ep.size, n_local).sum(1).tolist()
    recv_splits = recv_counts_PL.sum(1).tolist()
    # 2. The rows themselves, uneven splits.
    recv_ND = all_to_all(x_AD, output_splits=recv_splits, input_splits=send_splits, group=ep.group, counter=ep.counter,
                         label="dispatch_a2a")  # fmt: skip
    # 3. Contiguous groups per local expert, run, and back to arrival order.
    order_N = regroup_by_local_expert(recv_counts_PL)
    with region("experts"):
        out_sorted_ND = experts_local.forward_grouped(recv_ND.index_select(0, order_N), recv_counts_PL.sum(0).tolist())
    out_ND = torch.empty_like(out_sorted_ND).index_copy(0, order_N, out_sorted_ND)
    # 4. Results return along the reverse routes.
    return all_to_all(out_ND, output_splits=send_splits, input_splits=recv_splits, group=ep.group, counter=ep.counter,
                      label="combine_a2a")


@dataclass(frozen=True)
class ShuffleRoutes:
    """How one rank takes part in a BASE token shuffle over the group (host data only)."""

    send_order_T: torch.Tensor  # [T] local token indices in send order: rank q gets block q
    split: int  # T/P tokens to and from every rank of the group
    n_ranks: int  # P

    @property
    def splits(self) -> list[int]:
        return [self.split] * self.n_ranks


def shuffle_routes(seed: int, *, rank: int, n_ranks: int, tokens_per_rank: int) -> ShuffleRoutes:
    """BASE shuffle (Lewis 2021), exactly balanced: every rank sends T/P of its tokens, chosen
    at random, to every rank of the group (itself included), so every rank receives exactly T
    tokens, T/P from each source, and sends T*(P-1)/P rows to others per transfer.

    The generator seeded with `seed` draws one random order of the T tokens for each of the P
    ranks, in rank order; every rank draws the same P orders and uses row `rank`, so no
    permutation is sent. Rank r's block q (tokens send_order[q*T/P : (q+1)*T/P]) goes to
    rank q; a rank's shuffled group is what it receives, in arrival (source-major) order.
    """
    if tokens_per_rank % n_ranks:
        raise ValueError(
            f"BASE token shuffle needs the tokens per rank ({tokens_per_rank}) to be a multiple of the "
            f"expert-parallel degree ({n_ranks}): every rank sends T/P tokens to every rank"
        )
    generator = torch.Generator().manual_seed(seed)
    orders_PT = torch.stack([torch.randperm(tokens_per_rank, generator=generator) for _ in range(n_ranks)])
    return ShuffleRoutes(send_order_T=orders_PT[rank], split=tokens_per_rank // n_ranks, n_ranks=n_ranks)


def shuffle_tokens(x_TD: torch.Tensor, routes: ShuffleRoutes, ep: ExpertParallel) -> torch.Tensor:
    """Send T/P of my tokens to every rank; returns my shuffled group [T, D], source-major."""
    return all_to_all(
        x_TD.index_select(0, routes.send_order_T), output_splits=routes.splits,
        input_splits=routes.splits, group=ep.group, counter=ep.shuffle_counter,
    )  # fmt: skip


def unshuffle_tokens(y_TD: torch.Tensor, routes: ShuffleRoutes, ep: ExpertParallel) -> torch.Tensor:
    """Inverse of `shuffle_tokens`: results go home in the original token order."""
    back_TD = all_to_all(
        y_TD, output_splits=routes.splits, input_splits=routes.splits, group=ep.group,
        counter=ep.shuffle_counter,
    )  # fmt: skip
    return torch.empty_like(back_TD).index_copy(0, routes.send_order_T, back_TD)
