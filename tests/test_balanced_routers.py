"""The balanced routers (model/balanced_routers.py): BASE's auction against scipy's exact
assignment, Sinkhorn's plan marginals. Helpers and the literal cases are test_routers.py's."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from test_routers import F32_ATOL, identity_router

from moespec.model import router_losses
from moespec.model.routers import sinkhorn_log_plan
from moespec.spec.plan import BaseRouter, SinkhornRouter


# --- BASE ---------------------------------------------------------------------------------


def scipy_optimum(scores_TE: torch.Tensor) -> float:
    """Exact optimum of the balanced assignment (each expert column repeated T/E times,
    REFERENCE.md sec. 1), the oracle the router's auction is held to."""
    per_expert = scores_TE.shape[0] // scores_TE.shape[1]
    cost = -scores_TE.double().numpy().repeat(per_expert, axis=1)
    rows, cols = linear_sum_assignment(cost)
    return -cost[rows, cols].sum()


def test_base_training_exactly_balanced_on_skewed_input():
    router = identity_router(BaseRouter()).train()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(5)) + torch.tensor([4.0, 0, 0, 0])
    assert torch.bincount(x.argmax(-1), minlength=4)[0] > 8  # argmax alone would be skewed
    out = router(x)
    assert out.tokens_per_expert_E.tolist() == [4, 4, 4, 4]
    assert out.aux_loss.item() == 0.0 and out.losses == {}
    chosen = x.gather(1, out.expert_index_A[:, None]).squeeze(1)
    torch.testing.assert_close(out.gate_A, torch.sigmoid(chosen), rtol=0, atol=F32_ATOL)
    out.gate_A.sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0  # expert embeddings learn through the gate


def test_base_padding_when_T_not_multiple_of_E():
    router = identity_router(BaseRouter()).train()
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(6)) + torch.tensor([4.0, 0, 0, 0])
    counts = router(x).tokens_per_expert_E
    assert counts.sum() == 10 and counts.max() <= 3  # 12 padded slots, 3 per expert


def test_base_finds_planted_optimum():
    # Each token likes one expert by a margin of ~10 and the liked experts are balanced, so the
    # optimum is unique and any other balanced assignment moves a cycle of >= 2 tokens, losing
    # >= ~19. The default eps = range / T puts the auction within T * eps = range ~ 10.6 of it.
    planted = torch.arange(12) % 4
    x = 0.1 * torch.randn(12, 4, generator=torch.Generator().manual_seed(7))
    x[torch.arange(12), planted] += 10.0
    router = identity_router(BaseRouter()).train()
    assert router(x).expert_index_A.tolist() == planted.tolist()


def test_base_training_within_auction_bound_of_optimum():
    eps = 1e-3
    router = identity_router(BaseRouter(auction_eps=eps)).train()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(15))
    total = x.gather(1, router(x).expert_index_A[:, None]).sum().item()
    optimum = scipy_optimum(x)
    # auction guarantee T * eps, plus float32 rounding of a 16-term sum of values ~1 (1e-5)
    assert optimum - 16 * eps - 1e-5 <= total <= optimum + 1e-5


def test_base_eval_is_greedy_argmax():
    router = identity_router(BaseRouter()).eval()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(5)) + torch.tensor([4.0, 0, 0, 0])
    assert router(x).expert_index_A.tolist() == x.argmax(-1).tolist()


# --- sinkhorn -----------------------------------------------------------------------------


def test_sinkhorn_balances_skewed_logits():
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(8)) + torch.tensor([2.0, 1.0, 0, 0])
    router = identity_router(SinkhornRouter(iterations=8))
    train_load = router.train()(x).tokens_per_expert_E
    eval_load = router.eval()(x).tokens_per_expert_E
    assert eval_load.tolist() == torch.bincount(x.argmax(-1), minlength=4).tolist()
    assert train_load.max() < eval_load.max() and train_load.min() > eval_load.min()
    assert train_load.float().std() < 0.5 * eval_load.float().std()


def test_sinkhorn_plan_marginals_and_gate():
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(9)) * 3
    plan = sinkhorn_log_plan(logits.double(), 200).exp()
    # 200 iterations on a dense positive matrix converge far below this; 1e-6 of 8 tokens
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 8.0, dtype=torch.float64), rtol=0, atol=1e-6)
    router = identity_router(SinkhornRouter(iterations=0, z_loss_coef=0.5)).train()
    out = router(logits)  # zero iterations: plain argmax
    assert out.expert_index_A.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(out.gate_A, logits.softmax(-1).max(-1).values, rtol=0, atol=F32_ATOL)
    # the same float32 z-loss times 0.5 (exact): rel 1e-6 leaves room for one rounding only
    assert out.aux_loss.item() == pytest.approx(0.5 * router_losses.z_loss(logits).item(), rel=1e-6)
