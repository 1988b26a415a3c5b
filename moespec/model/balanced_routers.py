"""Routers that balance by assignment rather than by loss: BASE (Lewis et al. 2021, an
exact balanced assignment solved by auction) and S-BASE (Clark et al. 2022, Sinkhorn).
Both route each token to one expert and carry no auxiliary loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from moespec.model import router_losses
from moespec.model.auction import auction_assignment
from moespec.model.recompute import is_recomputing
from moespec.model.router_common import _full_precision, _token_choice_output, router_logits
from moespec.model.types import RouterOutput

class BaseRouting(nn.Module):
    """BASE layers (Lewis et al. 2021). The `gate` weight rows are the expert embeddings w_e.

    Training solves the balanced linear assignment (every expert exactly T/E tokens,
    maximising sum x_t . w_e) with the auction in `auction.py`; eval routes greedily to the
    argmax. The gate sigmoid(x_t . w_e) is how the expert embeddings learn. The token shuffle
    across the expert-parallel group (`router.shuffle`) belongs to the dispatcher, not here:
    within one group the assignment problem does not depend on token order.
    """

    def __init__(self, *, d_model: int, n_experts: int, auction_eps: float | None) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.auction_eps = auction_eps
        # The auction's expert prices at the end of the last training step: the next step
        # starts from them (the routing moves little between steps, so few tokens contest).
        # Persistent: a resumed run assigns as the uninterrupted one would.
        self.register_buffer("auction_price_E", torch.full((n_experts,), float("nan")))
        self._replay_price_E = None  # the prices the last first-run forward started from

    def forward(self, x_TD: torch.Tensor, *, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with _full_precision(x_TD):
            affinity_TE = router_logits(self.gate, x_TD)
            n_tokens, n_experts = affinity_TE.shape
            if self.training:
                # A forward replayed by recomputation starts where its first run started, so it
                # assigns exactly as that run did; only first runs move the prices on.
                replay = is_recomputing() and self._replay_price_E is not None
                start_E = self._replay_price_E if replay else self.auction_price_E.clone()
                expert_index_T, price_E = balanced_expert_index(affinity_TE.detach(), eps=self.auction_eps, price_init_E=start_E)
                if not replay and price_E is not None:
                    self._replay_price_E = start_E
                    self.auction_price_E.copy_(price_E)
            else:
                expert_index_T = affinity_TE.argmax(dim=-1)
            expert_index_T1 = expert_index_T.view(n_tokens, 1)
            gate_T1 = torch.sigmoid(affinity_TE.gather(1, expert_index_T1))
            return _token_choice_output(expert_index_T1, gate_T1, gate_T1, n_experts, {}, {})


def balanced_expert_index(scores_TE: torch.Tensor, *, eps: float | None,
                          price_init_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Balanced assignment for any T: pad with rows of zeros up to a multiple of E, solve,
    drop the padding. A constant row adds the same amount to every assignment's total, so the
    padding fills leftover slots without changing which real tokens go where. Returns
    ([T] long, the final prices [E] float32, None on meta); price_init_E warm-starts the
    auction (NaN entries: a cold start)."""
    n_tokens, n_experts = scores_TE.shape
    if scores_TE.device.type == "meta":
        # Meta tensors (shape and FLOP counting) hold no values to solve with; every balanced
        # assignment has the same shapes and costs, so take the round-robin one.
        return torch.arange(n_tokens, device=scores_TE.device) % n_experts, None
    result = auction_assignment(padded_scores(scores_TE), eps=eps, price_init_E=price_init_E)
    return result.expert_index_T[:n_tokens].to(device=scores_TE.device, dtype=torch.long), result.price_E.float()


def padded_scores(scores_TE: torch.Tensor) -> torch.Tensor:
    """[T', E] with T' the next multiple of E: rows of zeros appended (the auction needs T % E
    == 0; the scores themselves, no copy, when T already is one)."""
    n_tokens, n_experts = scores_TE.shape
    filler = math.ceil(n_tokens / n_experts) * n_experts - n_tokens
    return torch.cat([scores_TE, scores_TE.new_zeros(filler, n_experts)]) if filler else scores_TE


def sinkhorn_log_plan(logits_TE: torch.Tensor, iterations: int) -> torch.Tensor:
    """Log of the Sinkhorn-balanced matrix diag(u) exp(logits) diag(v) whose rows sum to 1 and
    whose columns approach the uniform expert marginal T/E (Clark et al. 2022, S-BASE).
    Log space keeps exp(logits) from overflowing. Ends on a column step: a row step does not
    change any row's argmax. [T, E]"""
    n_tokens, n_experts = logits_TE.shape
    log_column_target = math.log(n_tokens / n_experts)
    log_plan_TE = logits_TE
    for _ in range(iterations):
        log_plan_TE = log_plan_TE - log_plan_TE.logsumexp(dim=1, keepdim=True)  # rows sum to 1
        log_plan_TE = log_plan_TE - log_plan_TE.logsumexp(dim=0, keepdim=True) + log_column_target
    return log_plan_TE


class SinkhornRouting(nn.Module):
    """S-BASE: top-1 of the Sinkhorn-balanced matrix in training (no gradient through the
    balancing), argmax at eval; the gate is the plain softmax prob of the chosen expert."""

    def __init__(self, *, d_model: int, n_experts: int, bias: bool, iterations: int, z_loss_coef: float) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=bias)
        self.iterations, self.z_loss_coef = iterations, z_loss_coef

    def forward(self, x_TD: torch.Tensor, *, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        with _full_precision(x_TD):
            logits_TE = router_logits(self.gate, x_TD)
            if self.training:
                with torch.no_grad():
                    expert_index_T = sinkhorn_log_plan(logits_TE.detach(), self.iterations).argmax(dim=-1)
            else:
                expert_index_T = logits_TE.argmax(dim=-1)
            expert_index_T1 = expert_index_T.view(-1, 1)
            gate_T1 = logits_TE.softmax(dim=-1).gather(1, expert_index_T1)
            losses = {"z_loss": router_losses.z_loss(logits_TE)}
            return _token_choice_output(expert_index_T1, gate_T1, gate_T1, logits_TE.shape[-1], losses,
                                        {"z_loss": self.z_loss_coef})


