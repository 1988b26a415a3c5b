"""The MoE layer: route, dispatch, run the experts, combine; plus shared experts.

Shape legend: B batch, S sequence, T = B*S tokens in the routing group, D d_model, F expert
d_ff, E experts, K experts per token, C capacity slots per expert, A assignments, R = E*C rows
of the fixed expert buffer.

Two fast paths, chosen by the capacity plan at each forward, and one oracle:
- capacity (C from `CapacityPlan.capacity(T, K, E, training=...)`): the kept assignments are
  copied into a zero-padded [E, C, D] buffer (a gather from x with one extra zero row that
  empty slots read), the experts run batched matmuls on it, and each row's output, times its
  gate, is added back to its token. Dropped assignments add nothing: the block's residual
  carries the token. No host sync anywhere, so it runs on the meta device.
- dropless (`dropless: true`, or BASE layers whose plan has no capacity): the assignments are
  sorted by expert once, and the expert bank gathers each group's rows, runs one matmul per
  group and adds the gated outputs back to their tokens (`ExpertBank.forward_dropless`). The
  group sizes go to the host (one sync per layer), as the dropless all-to-all needs them too.
- `forward(..., reference=True)`: per expert, pick its assignments in priority order with a
  Python sort, keep the first C, and run `ExpertBank.reference_forward`. It shares no index
  math with `plan_dispatch`, so it checks it.
Gates multiply in float32 and the sum is cast to x's dtype (REFERENCE.md sec. 1).

What travels is in the compute dtype (`experts.compute_dtype`: autocast's bf16/fp16, else x's):
the capacity buffer and the dropless rows are cast before they are gathered, and BASE's
shuffled tokens before they are shuffled, so under autocast every all-to-all moves 2-byte
elements (REFERENCE.md sec. 4, `b`). The local dropless path sends nothing; its grouped kernel
casts each group as it gathers it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moespec.distributed.expert_parallel import (
    capacity_exchange,
    dropless_exchange,
    shuffle_routes,
    shuffle_tokens,
    unshuffle_tokens,
)
from moespec.model.balanced_routers import BaseRouting
from moespec.model.dispatch import DispatchPlan, plan_dispatch
from moespec.model.experts import ExpertBank, build_shared_experts, compute_dtype, gate_dtype
from moespec.model.recompute import is_recomputing
from moespec.model.regions import region
from moespec.model.routers import build_router
from moespec.model.types import MoEStats, RouterOutput
from moespec.spec.plan import CapacityPlan, MoELayerPlan


def combine_weighted(out_RD: torch.Tensor, gate_R: torch.Tensor, token_R: torch.Tensor, n_rows: int, dtype) -> torch.Tensor:
    """y[token[r]] += gate[r] * out[r], gate applied in float32 (float64 kept), result in
    `dtype`. [n_rows, D]"""
    gdtype = gate_dtype(dtype)
    weighted_RD = (out_RD.to(gdtype) * gate_R.to(gdtype)[:, None]).to(dtype)
    y_ND = weighted_RD.new_zeros(n_rows, out_RD.shape[1])
    return y_ND.index_add(0, token_R, weighted_RD)


def moe_capacity(x_TD: torch.Tensor, route: RouterOutput, plan: DispatchPlan, experts: ExpertBank, ep=None) -> torch.Tensor:
    """Capacity mode on the fixed [E, C, D] buffer; padding rows are computed and discarded.
    With expert parallelism (`ep`) the buffer goes through the group's experts by all-to-all."""
    n_tokens, d_model = x_TD.shape
    n_experts, capacity = plan.n_experts, plan.capacity
    n_rows = n_experts * capacity  # R; row R is the spare that dropped assignments point at
    # Which token fills each buffer row: T (an appended zero row of x) where the slot is empty.
    token_R = torch.full((n_rows + 1,), n_tokens, dtype=torch.long, device=x_TD.device)
    token_R = token_R.scatter(0, plan.row_A, route.token_index_A)[:n_rows]
    with region("permute"):
        gate_A = route.gate_A.to(gate_dtype(route.gate_A.dtype))
        gate_R = gate_A.new_zeros(n_rows + 1).scatter(0, plan.row_A, gate_A)[:n_rows]
        x_cast_TD = x_TD.to(compute_dtype(x_TD))  # the buffer (and its all-to-all) in the compute dtype
        x_padded_TD = torch.cat([x_cast_TD, x_cast_TD.new_zeros(1, d_model)])  # [T+1, D]
        x_ECD = x_padded_TD.index_select(0, token_R).view(n_experts, capacity, d_model)
    if ep is None:
        with region("experts"):
            out_ECD = experts.forward_capacity(x_ECD)
    else:
        out_ECD = capacity_exchange(x_ECD, experts, ep)
    with region("permute"):
        y_TD = combine_weighted(out_ECD.reshape(n_rows, d_model), gate_R, token_R, n_tokens + 1, x_TD.dtype)
    return y_TD[:n_tokens]


def moe_dropless(x_TD: torch.Tensor, route: RouterOutput, plan: DispatchPlan, experts: ExpertBank, ep=None, *,
                 balanced: bool = False) -> torch.Tensor:  # fmt: skip
    """Dropless: every assignment kept; the expert bank gathers, computes and combines the
    sorted assignments group by group (see GroupedExpertsFn for why in one op). With expert
    parallelism the sorted rows travel to their experts' ranks and back (uneven splits).
    `balanced` (BASE in training): groups left uneven by the assignment's padding (T % E != 0)
    are padded back to equal ones (`pad_groups`), so that the experts run as one bmm."""
    token_sorted_A = route.token_index_A[plan.order_A]
    gate_sorted_A = route.gate_A[plan.order_A]
    if ep is not None:
        with region("permute"):
            # rows grouped by global expert, in the compute dtype (what the all-to-all sends)
            x_AD = x_TD.to(compute_dtype(x_TD)).index_select(0, token_sorted_A)
        out_AD = dropless_exchange(x_AD, plan.tokens_per_expert_E, experts, ep)
        with region("permute"):
            return combine_weighted(out_AD, gate_sorted_A, token_sorted_A, x_TD.shape[0], x_TD.dtype)
    if x_TD.device.type == "meta":
        # Meta tensors hold no routing, only shapes: take the balanced split (as the simulator
        # does), so full-size dropless models can be checked without memory.
        n_assign, n_experts = token_sorted_A.shape[0], plan.n_experts
        counts_E = [n_assign // n_experts + (e < n_assign % n_experts) for e in range(n_experts)]
    else:
        counts_E = plan.tokens_per_expert_E.tolist()  # the one host sync of a dropless layer
    if balanced and token_sorted_A.shape[0] % plan.n_experts:
        with region("permute"):
            token_sorted_A, gate_sorted_A, counts_E = pad_groups(token_sorted_A, gate_sorted_A, counts_E)
    with region("experts"):
        return experts.forward_dropless(x_TD, token_sorted_A, gate_sorted_A, counts_E)


def pad_groups(token_A: torch.Tensor, gate_A: torch.Tensor, counts_E: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every group of the sorted rows padded at its end to M = ceil(A / E) rows that gather
    token 0 with gate 0: [E * M]. BASE assigns T tokens plus E*M - T padding tokens, exactly M
    per expert, then drops the padding, which leaves the groups uneven. Padded again, they are
    an [E, M, .] batch, one bmm per projection (`group_matmuls.uniform_rows`) rather than E
    matmuls (a BASE layer at T 2048, E 12 was 1.28-1.37x a Switch layer). The pad rows cost
    E*M - T < E rows of FLOPs (the simulator counts them: counts.capacity_rows) and change
    nothing: gate 0 zeroes their output and every gradient through them."""
    n_experts = len(counts_E)
    rows = -(-token_A.shape[0] // n_experts)
    pads_before_E = torch.tensor([0] + [rows - n for n in counts_E[:-1]], device=token_A.device).cumsum(0)
    position_A = torch.arange(token_A.shape[0], device=token_A.device) + pads_before_E.repeat_interleave(
        torch.tensor(counts_E, device=token_A.device), output_size=token_A.shape[0])  # fmt: skip
    token_P = token_A.new_zeros(n_experts * rows).index_copy_(0, position_A, token_A)
    gate_P = gate_A.new_zeros(n_experts * rows).index_copy(0, position_A, gate_A)  # gradients flow back to gate_A
    return token_P, gate_P, [rows] * n_experts


def reference_keep(route: RouterOutput, priority_A: torch.Tensor | None, *, n_experts: int, capacity: int | None) -> list[int]:
    """The kept assignments, the obvious way: per expert, its assignments ranked by
    (token, position in A) or (-priority, position in A); the first C stay."""
    token, expert = route.token_index_A.tolist(), route.expert_index_A.tolist()
    priority = None if priority_A is None else priority_A.tolist()
    kept = []
    for e in range(n_experts):
        mine = [a for a in range(len(expert)) if expert[a] == e]
        mine.sort(key=(lambda a: (token[a], a)) if priority is None else (lambda a: (-priority[a], a)))
        kept += mine if capacity is None else mine[:capacity]
    return kept


class MoELayer(nn.Module):
    """Router + expert bank (+ shared experts). forward(x) -> (y, MoEStats, aux_loss).

    `capacity` None (BASE) or dropless means every assignment is kept. Holds no spec object:
    the capacity plan is a frozen dataclass of plain values.
    """

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: ExpertBank,
        shared: nn.Module | None,
        capacity: CapacityPlan | None,
        experts_per_token: int,
        layer_index: int,
        router_name: str | None = None,
        shuffle_tokens: bool = False,
        gate_input: bool = False,
        n_experts_total: int | None = None,
    ):
        super().__init__()
        self.gate_input = gate_input  # Llama-4: the (top-1) gate scales the expert's input
        self.router = router
        self.experts = experts
        self.n_experts_total = n_experts_total or experts.n_experts  # E; the local bank holds E/P under EP
        self.shuffle_tokens = shuffle_tokens  # BASE: shuffle across the EP group in training
        self.expert_parallel = None  # an ExpertParallel once `shard_experts` ran
        self._shuffles = 0  # first-run forwards that shuffled: the permutation's seed counter
        self._last_shuffle = 0  # the counter value of the last first-run shuffle (for replays)
        self.shared = shared
        self.capacity_plan = capacity
        self.experts_per_token = experts_per_token
        self.layer_index = layer_index
        self.router_name = router_name or type(router).__name__

    @property
    def n_experts(self) -> int:
        return self.n_experts_total

    def shard_experts(self, ep) -> None:
        """Keep only experts [ep.rank * L, (ep.rank + 1) * L) and route through the EP group.
        A bank built with just those experts (`build_model(expert_shard=...)`) is kept as is;
        a whole one (the same seed on every rank, or loaded weights) is sliced."""
        full = self.experts
        n_local = self.n_experts_total // ep.size
        first = ep.rank * n_local
        if full.n_experts == n_local and full.first_expert == first:
            self.expert_parallel = ep
            return
        if full.n_experts != self.n_experts_total:
            raise ValueError(f"layer {self.layer_index}: a bank of experts [{full.first_expert}, {full.first_expert + full.n_experts}) cannot be cut for ep rank {ep.rank} of {ep.size}")
        with torch.device("meta"):
            local = ExpertBank(
                n_experts=n_local, d_model=full.d_model, d_ff=full.d_ff, activation=full.activation, init_std=full.init_std,
                down_init_std=full.down_init_std, bias=full.bias, first_expert=first, init_seed=full.init_seed,
            )  # fmt: skip
        local = local.to_empty(device=next(full.parameters()).device)
        keep = slice(first, first + n_local)
        with torch.no_grad():
            for name, weight in local.named_parameters():
                weight.copy_(getattr(full, name)[keep])
        self.experts = local
        self.expert_parallel = ep

    def _shuffle_routes(self, n_tokens: int):
        """BASE's random token shuffle over the EP group: every rank draws the same orders
        (same seed: layer index and call count), so no permutation is sent. A forward replayed
        by activation recomputation (`is_recomputing()`) reuses the count of this layer's last
        first-run forward, so it shuffles exactly as the run whose activations it rebuilds."""
        ep = self.expert_parallel
        if not is_recomputing():
            self._last_shuffle = self._shuffles
            self._shuffles += 1
        seed = 1_000_003 * (self.layer_index + 1) + self._last_shuffle
        return shuffle_routes(seed, rank=ep.rank, n_ranks=ep.size, tokens_per_rank=n_tokens)

    def capacity(self, n_tokens: int) -> int | None:
        """C for a routing group of n_tokens in the current mode (train or eval factor)."""
        if self.capacity_plan is None:
            return None
        return self.capacity_plan.capacity(n_tokens, self.experts_per_token, self.n_experts, training=self.training)

    def _priority(self, route: RouterOutput) -> torch.Tensor | None:
        """None ranks by position; the router prob for drop_policy: probability. A router
        that reports no priority (expert choice) ranks by its gate instead."""
        if self.capacity_plan is None or self.capacity_plan.drop_policy == "position":
            return None
        return (route.priority_A if route.priority_A is not None else route.gate_A).detach()

    def forward(
        self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None, reference: bool = False
    ) -> tuple[torch.Tensor, MoEStats, torch.Tensor]:
        """x [B, S, D] or [T, D] -> (y like x, MoEStats, aux_loss [] float32, float64 kept).

        token_ids (same leading shape as x) are needed by hash routing only. reference=True
        runs the slow oracle instead of the fast path, for parity tests.
        """
        d_model = x.shape[-1]
        x_TD = x.reshape(-1, d_model)  # [T, D]
        n_tokens = x_TD.shape[0]
        token_ids_T = None if token_ids is None else token_ids.reshape(-1)
        ep = None if reference else self.expert_parallel
        routes = None
        if ep is not None and self.shuffle_tokens and self.training and ep.size > 1:
            routes = self._shuffle_routes(n_tokens)
            x_in_TD = x_TD
            x_TD = shuffle_tokens(x_TD.to(compute_dtype(x_TD)), routes, ep)  # sent in the compute dtype
            token_ids_T = None  # only BASE shuffles, and it routes without token ids: none are sent
        sent_before = 0 if ep is None else ep.counter.forward_bytes
        with region("router"):
            route = self.router(x_TD, token_ids_T=token_ids_T)
        capacity = self.capacity(n_tokens)
        priority_A = self._priority(route)
        x_routed_TD = x_TD
        if self.gate_input:  # one assignment per token: scale the token itself, then combine with weight 1
            gate_T = route.gate_A.new_zeros(n_tokens).index_put((route.token_index_A,), route.gate_A)  # [T]
            x_routed_TD = (x_TD.to(gate_T.dtype) * gate_T[:, None]).to(x_TD.dtype)
            route = dataclasses.replace(route, gate_A=torch.ones_like(route.gate_A))
        n_assign = route.expert_index_A.shape[0]

        if reference:
            kept = reference_keep(route, priority_A, n_experts=self.n_experts, capacity=capacity)
            kept_A = torch.tensor(kept, dtype=torch.long, device=x.device)
            y_TD = self.experts.reference_forward(
                x_routed_TD, route.token_index_A[kept_A], route.expert_index_A[kept_A], route.gate_A[kept_A]
            )
            dropped = torch.tensor(n_assign - len(kept), device=x.device)
            routed_E = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
            routed_E.index_add_(0, route.expert_index_A, torch.ones_like(route.expert_index_A))
        else:
            with region("permute"):
                plan = plan_dispatch(
                    route.expert_index_A, route.token_index_A, priority_A, n_experts=self.n_experts, capacity=capacity
                )
            if capacity is None:
                y_TD = moe_dropless(x_routed_TD, route, plan, self.experts, ep, balanced=self.training and isinstance(self.router, BaseRouting))
            else:
                y_TD = moe_capacity(x_routed_TD, route, plan, self.experts, ep)
            dropped, routed_E = plan.dropped, plan.tokens_per_expert_E

        if routes is not None:
            # y left the combine in the shuffled x's dtype, the compute dtype: it travels home so.
            y_TD = unshuffle_tokens(y_TD, routes, ep).to(x_in_TD.dtype)
            x_TD = x_in_TD
        if self.shared is not None:
            with region("shared_experts"):
                y_TD = y_TD + self.shared(x_TD)
        if route.tokens_per_expert_E is not None:
            routed_E = route.tokens_per_expert_E
        stats = MoEStats(
            layer=self.layer_index,
            router=self.router_name,
            tokens_per_expert_E=routed_E.detach(),
            dropped_fraction=dropped.to(torch.float32) / max(n_assign, 1),
            losses={name: value.detach() for name, value in route.losses.items()},
            a2a_bytes=0 if ep is None else ep.counter.forward_bytes - sent_before,
        )
        return y_TD.reshape(x.shape), stats, route.aux_loss.to(gate_dtype(route.aux_loss.dtype))


def build_moe_layer(
    plan: MoELayerPlan,
    *,
    d_model: int,
    activation: str,
    layer_index: int,
    init_std: float = 0.02,
    down_init_std: float | None = None,
    expert_shard: tuple[int, int] | None = None,
) -> MoELayer:
    """The MoE layer a plan describes. Parameters: the router's, E * (3 or 2) * D * F for the
    routed experts (3 for gated activations), and the shared experts (their gate: D more).
    `down_init_std` lets the model builder scale the residual-facing projections.
    expert_shard (ep rank, ep size): build only that rank's E/ep experts, with the values the
    whole bank would give them."""
    e = plan.experts
    router = build_router(plan.router, d_model=d_model, n_experts=e.count, capacity=plan.capacity)
    rank, size = expert_shard or (0, 1)
    if e.count % size:
        raise ValueError(f"{e.count} experts do not split over ep {size}")
    experts = ExpertBank(
        n_experts=e.count // size,
        first_expert=rank * (e.count // size),
        d_model=d_model,
        d_ff=e.d_ff,
        activation=activation,
        init_std=init_std,
        down_init_std=down_init_std,
        bias=e.bias,
    )
    shared = build_shared_experts(
        d_model=d_model, count=e.shared_count, d_ff=e.shared_d_ff, activation=activation, gated_output=e.shared_gate
    )
    if shared is not None:
        with torch.no_grad():
            for name, weight in shared.named_parameters():
                std = down_init_std if name.endswith("w_down.weight") and down_init_std is not None else init_std
                nn.init.normal_(weight, std=std)
    return MoELayer(
        router=router,
        experts=experts,
        shared=shared,
        capacity=plan.capacity,
        experts_per_token=plan.router.experts_per_token,
        layer_index=layer_index,
        router_name=plan.router.type,
        shuffle_tokens=plan.router.type == "base" and plan.router.shuffle,
        gate_input=e.gate_input,
        n_experts_total=e.count,
    )
