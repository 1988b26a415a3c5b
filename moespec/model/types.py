"""Values passed between router, dispatcher, experts and model, so each piece stays replaceable.

Shape legend (one routing group): T tokens, D d_model, F expert d_ff, E experts, K experts
per token, A assignments (token, expert) pairs: T*K for token-choice routers, E*C for
expert choice, C capacity slots per expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RouterOutput:
    """Who goes where, with what weight. Assignments are flat so that token-choice (top-k)
    and expert-choice routers share one dispatcher."""

    token_index_A: torch.Tensor  # [A] long: token carried by each assignment
    expert_index_A: torch.Tensor  # [A] long: expert it goes to
    gate_A: torch.Tensor  # [A] float32: combine weight (differentiable where the router is)
    priority_A: torch.Tensor | None  # [A] float32 router prob for drop_policy=probability
    aux_loss: torch.Tensor  # [] float32: sum of coefficient-weighted auxiliary losses
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, each []
    # Tokens per expert counted before capacity dropping, [E] long.
    tokens_per_expert_E: torch.Tensor | None = None


@dataclass
class MoEStats:
    """Routing statistics of one MoE layer for one forward. Tensors are detached; call
    `as_floats` only where a host sync is acceptable (logging, tests)."""

    layer: int
    router: str
    tokens_per_expert_E: torch.Tensor  # [E] long, routed before dropping
    dropped_fraction: torch.Tensor  # [] float32, share of assignments over capacity
    losses: dict[str, torch.Tensor]  # unweighted, detached
    a2a_bytes: int = 0  # bytes this rank sent to other ranks in dispatch + combine (forward)

    def as_floats(self) -> dict:
        return {
            "layer": self.layer,
            "router": self.router,
            "tokens_per_expert": [int(v) for v in self.tokens_per_expert_E.tolist()],
            "dropped_fraction": float(self.dropped_fraction),
            "losses": {name: float(value) for name, value in self.losses.items()},
            "a2a_bytes": self.a2a_bytes,
        }


@dataclass
class ModelAux:
    """What a model forward returns besides logits: nothing is kept globally."""

    aux_loss: torch.Tensor  # [] float32, summed over MoE layers (already coefficient-weighted)
    moe: list[MoEStats] = field(default_factory=list)
