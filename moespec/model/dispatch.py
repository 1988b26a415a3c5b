"""The routing-plan function: where every (token, expert) assignment goes, as pure index math.

One function, `plan_dispatch`, serves the runtime (the MoE layer and the expert-parallel
dispatcher) and the simulator, so the cost model cannot drift from what runs. It touches no
process group and no module, and in capacity mode it never reads a value back to the host
(no `.item()`, no `.tolist()`, no boolean-mask indexing), so it runs on the meta device, which
is how full-size models are checked without memory.

Shape legend: T tokens in the routing group, E experts, C capacity slots per expert,
A assignments (T*K for token-choice routers, E*C for expert choice), P ranks in the
expert-parallel group, R = E*C rows of the fixed expert buffer.

How the permutation is built, step by step (REFERENCE.md sec. 2):
1. Give every assignment a sort key: its expert first, then its rank key inside the expert,
   which is the token index for `drop_policy: position` (Switch: earlier tokens win) or the
   router probability, highest first, for `drop_policy: probability` (batch-prioritised
   routing, Riquelme 2021).
2. One stable sort of the keys gives `order_A`: the assignments grouped by expert, each group
   contiguous and already in priority order. Ties keep their original order.
3. Counting assignments per expert (a scatter-add, not bincount, which has no meta kernel)
   and an exclusive cumsum gives each group's start; an assignment's slot in its expert is
   its sorted position minus its group's start.
4. With capacity C, slot < C is kept; the rest are dropped (their MoE output is zero and the
   residual carries the token on). Kept assignment a occupies row `expert * C + slot` of the
   fixed `[E, C, D]` buffer; dropped ones point at one spare row R, which callers slice off.
5. Expert e lives on expert-parallel rank e // (E / P). With capacity every rank receives
   its full `[E/P, C, D]` slice of the buffer, so the counts are fixed: C * E / P rows to each
   rank. Dropless, a rank receives exactly the assignments routed to its experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moespec.model.router_losses import expert_counts as count_per_expert  # one counting function for both


@dataclass(frozen=True)
class DispatchPlan:
    """The result of `plan_dispatch`. All tensors live on the input's device.

    `order_A` and the `*_sorted_A` fields are in expert-sorted order; `slot_A`, `kept_A` and
    `row_A` are indexed like the input assignments.
    """

    order_A: torch.Tensor  # [A] long: permutation sorting assignments by (expert, rank key)
    expert_sorted_A: torch.Tensor  # [A] long: expert_index_A[order_A], non-decreasing
    slot_A: torch.Tensor  # [A] long: rank of each assignment among those sent to its expert
    kept_A: torch.Tensor  # [A] bool: slot < capacity (all True when dropless)
    row_A: torch.Tensor | None  # [A] long: buffer row expert*C + slot, or R when dropped
    tokens_per_expert_E: torch.Tensor  # [E] long: routed, before dropping
    kept_per_expert_E: torch.Tensor  # [E] long: min(routed, C)
    dropped: torch.Tensor  # [] long: assignments over capacity
    send_counts_P: torch.Tensor  # [P] long: rows sent to each expert-parallel rank
    capacity: int | None  # C, None when dropless
    n_experts: int
    ep_size: int


def sort_by_expert(
    expert_index_A: torch.Tensor, token_index_A: torch.Tensor, priority_A: torch.Tensor | None
) -> torch.Tensor:
    """The permutation grouping assignments by expert, each group in drop-priority order.

    Without priorities the key is the integer `expert * (max_token + 1) + token`, so one
    stable sort does it (max_token stays a tensor: no host sync). With priorities two stable
    sorts: highest priority first, then by expert, which keeps that order inside each expert.
    """
    if priority_A is None:
        span = token_index_A.max() + 1 if token_index_A.numel() else token_index_A.new_ones(())
        key_A = expert_index_A * span + token_index_A
        return torch.argsort(key_A, stable=True)
    by_priority_A = torch.argsort(priority_A, descending=True, stable=True)
    by_expert_A = torch.argsort(expert_index_A[by_priority_A], stable=True)
    return by_priority_A[by_expert_A]


def plan_dispatch(
    expert_index_A: torch.Tensor,
    token_index_A: torch.Tensor,
    priority_A: torch.Tensor | None,
    *,
    n_experts: int,
    capacity: int | None,
    ep_size: int = 1,
) -> DispatchPlan:
    """Sort assignments by expert, give each a slot, drop those over capacity, count sends.

    priority_A: None ranks by position (token order); a tensor ranks by it, highest first.
    capacity: C slots per expert, or None for dropless (every assignment kept, `row_A` None).
    ep_size: P, the expert-parallel degree; it must divide n_experts.
    """
    if n_experts % ep_size:
        raise ValueError(f"n_experts ({n_experts}) must be a multiple of ep_size ({ep_size})")
    n_assign = expert_index_A.shape[0]
    device = expert_index_A.device
    order_A = sort_by_expert(expert_index_A, token_index_A, priority_A)
    expert_sorted_A = expert_index_A[order_A]

    tokens_per_expert_E = count_per_expert(expert_index_A, n_experts)
    start_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E  # exclusive cumsum
    slot_sorted_A = torch.arange(n_assign, device=device) - start_E[expert_sorted_A]
    slot_A = torch.empty_like(slot_sorted_A).scatter_(0, order_A, slot_sorted_A)

    experts_per_rank = n_experts // ep_size
    if capacity is None:
        kept_A = torch.ones(n_assign, dtype=torch.bool, device=device)
        row_A = None
        kept_per_expert_E = tokens_per_expert_E
        send_counts_P = tokens_per_expert_E.view(ep_size, experts_per_rank).sum(1)  # [P]
    else:
        kept_A = slot_A < capacity
        spare_row = n_experts * capacity  # R: where dropped assignments point
        row_A = torch.where(kept_A, expert_index_A * capacity + slot_A, spare_row)
        kept_per_expert_E = tokens_per_expert_E.clamp(max=capacity)
        send_counts_P = torch.full((ep_size,), capacity * experts_per_rank, dtype=torch.long, device=device)
    dropped = n_assign - kept_per_expert_E.sum()
    return DispatchPlan(
        order_A=order_A,
        expert_sorted_A=expert_sorted_A,
        slot_A=slot_A,
        kept_A=kept_A,
        row_A=row_A,
        tokens_per_expert_E=tokens_per_expert_E,
        kept_per_expert_E=kept_per_expert_E,
        dropped=dropped,
        send_counts_P=send_counts_P,
        capacity=capacity,
        n_experts=n_experts,
        ep_size=ep_size,
    )
