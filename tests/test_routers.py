"""Routers against hand-computed values and independent re-implementations of each formula
(the balanced ones, BASE and Sinkhorn, in test_balanced_routers.py; SparseMixer against
transformers' own in test_sparsemixer.py), and what every router shares.

Most tests use D == E and W_r = I, so that x *is* the logit matrix and the expected numbers
can be written down. The literal case LOGITS has probabilities [.4, .3, .2, .1] (token 0) and
[.6, .1, .1, .2] (token 1); both rows have logsumexp ln 10.
"""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from moespec.model import router_losses
from moespec.model.routers import (
    SigmoidBiasRouting,
    build_router,
    hash_expert_index,
    update_router_biases,
)
from moespec.spec.plan import (
    BaseRouter,
    CapacityPlan,
    ExpertChoiceRouter,
    HashRouter,
    NoisyTopKRouter,
    SigmoidBiasRouter,
    SinkhornRouter,
    SparseMixerRouter,
    SwitchRouter,
    TopKRouter,
)

LOGITS = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0], [6.0, 1.0, 1.0, 2.0]]))
# float32 probabilities and logs of values of order 1 carry a few ulps (1.2e-7 each) of error.
F32_ATOL = 1e-6


def identity_router(plan, n_experts=4, capacity=None) -> nn.Module:
    """A router whose logits equal its input (D == E, W_r = I, bias 0)."""
    router = build_router(plan, d_model=n_experts, n_experts=n_experts, capacity=capacity)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(n_experts))
        if router.gate.bias is not None:
            router.gate.bias.zero_()
    return router


def capacity_plan(factor, eval_factor=None, min_capacity=1) -> CapacityPlan:
    return CapacityPlan(factor=factor, eval_factor=eval_factor, min_capacity=min_capacity,
                        drop_policy="position", dropless=False)


# --- topk ---------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_hand_computed(normalize):
    router = identity_router(TopKRouter(k=2, normalize=normalize, aux_loss_coef=0.01, z_loss_coef=0.1)).eval()
    out = router(LOGITS)
    assert out.token_index_A.tolist() == [0, 0, 1, 1]
    assert out.expert_index_A.tolist() == [0, 1, 0, 3]  # descending prob within each token
    expected_gates = [0.4 / 0.7, 0.3 / 0.7, 0.6 / 0.8, 0.2 / 0.8] if normalize else [0.4, 0.3, 0.6, 0.2]
    torch.testing.assert_close(out.gate_A, torch.tensor(expected_gates), rtol=0, atol=F32_ATOL)
    torch.testing.assert_close(out.priority_A, torch.tensor([0.4, 0.3, 0.6, 0.2]), rtol=0, atol=F32_ATOL)
    assert out.tokens_per_expert_E.tolist() == [2, 1, 0, 1]
    # f = [2, 1, 0, 1] / 4, P = mean probs = [.5, .2, .15, .15]: 4 * (.25 + .05 + 0 + .0375)
    load_balancing = 4 * (0.5 * 0.5 + 0.25 * 0.2 + 0.0 * 0.15 + 0.25 * 0.15)
    assert load_balancing == pytest.approx(1.35)  # float64 arithmetic check of the line above
    z = math.log(10.0) ** 2  # both rows have logsumexp ln 10
    assert out.losses["load_balancing"].item() == pytest.approx(load_balancing, abs=F32_ATOL)
    assert out.losses["z_loss"].item() == pytest.approx(z, abs=1e-5)  # ~5.3: a few ulps of 5
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.dim() == 0
    assert out.aux_loss.item() == pytest.approx(0.01 * load_balancing + 0.1 * z, abs=1e-5)


def test_load_balancing_is_one_at_balance_and_E_at_collapse():
    uniform_TE = torch.full((8, 4), 0.25)
    balanced_A = torch.arange(8) % 4
    # pytest.approx's rel 1e-6: quarters and small integers are exact in float32, so only the
    # final sum could round, by an ulp
    assert router_losses.load_balancing_loss(uniform_TE, balanced_A).item() == pytest.approx(1.0)
    collapsed_TE = torch.zeros(8, 4).index_fill_(1, torch.tensor([2]), 1.0)
    assert router_losses.load_balancing_loss(collapsed_TE, torch.full((8,), 2)).item() == pytest.approx(4.0)


def test_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # rows: logsumexp = ln 2 and ln 4
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_losses.z_loss(logits).item() == pytest.approx(expected, abs=F32_ATOL)


def test_zero_coefficients_give_zero_aux_loss():
    router = identity_router(TopKRouter(k=2, aux_loss_coef=0.0, z_loss_coef=0.0))
    out = router(LOGITS)
    assert out.aux_loss.item() == 0.0
    assert set(out.losses) == {"load_balancing", "z_loss"}  # still reported


def test_topk_gradcheck_float64():
    torch.manual_seed(0)
    router = build_router(TopKRouter(k=2, normalize=True, bias=True, z_loss_coef=0.1),
                          d_model=5, n_experts=4, capacity=None).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    weight = router.gate.weight.detach().clone().requires_grad_(True)
    bias = router.gate.bias.detach().clone().requires_grad_(True)

    def gates_and_aux(x, weight, bias):
        out = torch.func.functional_call(router, {"gate.weight": weight, "gate.bias": bias}, (x,))
        assert out.gate_A.dtype == torch.float64
        return out.gate_A, out.aux_loss

    # gradcheck's default eps 1e-6 and atol 1e-5 suit float64; the random logits are far
    # (>> 1e-6) from a top-k tie, so no perturbation flips a choice.
    assert torch.autograd.gradcheck(gates_and_aux, (x, weight, bias))


# --- switch -------------------------------------------------------------------------------


def test_switch_eval_hand_computed():
    router = identity_router(SwitchRouter(aux_loss_coef=0.01, z_loss_coef=0.001, jitter_eps=0.1)).eval()
    out = router(LOGITS)  # eval: no jitter
    assert out.expert_index_A.tolist() == [0, 0]
    torch.testing.assert_close(out.gate_A, torch.tensor([0.4, 0.6]), rtol=0, atol=F32_ATOL)
    # f = [1, 0, 0, 0], P_0 = .5: 4 * .5
    assert out.losses["load_balancing"].item() == pytest.approx(2.0, abs=F32_ATOL)
    z = math.log(10.0) ** 2
    assert out.aux_loss.item() == pytest.approx(0.01 * 2.0 + 0.001 * z, abs=F32_ATOL)


def test_switch_training_jitter_reproduced():
    eps = 0.3
    router = identity_router(SwitchRouter(jitter_eps=eps)).train()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    out = router(x)
    torch.manual_seed(123)
    jittered = x * torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    probs = jittered.softmax(-1)
    assert torch.equal(out.expert_index_A, probs.argmax(-1))
    torch.testing.assert_close(out.gate_A, probs.max(-1).values, rtol=0, atol=F32_ATOL)
    assert not torch.allclose(out.gate_A, x.softmax(-1).max(-1).values)  # the jitter did act


# --- noisy top-k --------------------------------------------------------------------------


def test_noisy_topk_eval_hand_computed():
    router = identity_router(NoisyTopKRouter(k=2, importance_coef=0.1, load_coef=0.2)).eval()
    out = router(LOGITS)
    assert out.expert_index_A.tolist() == [0, 1, 0, 3]
    # softmax over the kept logits: ln4, ln3 -> 4/7, 3/7 and ln6, ln2 -> 3/4, 1/4
    torch.testing.assert_close(out.gate_A, torch.tensor([4 / 7, 3 / 7, 0.75, 0.25]), rtol=0, atol=F32_ATOL)
    importance = np.array([4 / 7 + 0.75, 3 / 7, 0.0, 0.25])
    cv2_importance = importance.var() / importance.mean() ** 2  # numpy var is population var
    load = np.array([2.0, 1.0, 0.0, 1.0])  # eval: the count; mean 1, population var .5
    assert out.losses["importance"].item() == pytest.approx(cv2_importance, abs=F32_ATOL)
    assert out.losses["load"].item() == pytest.approx(0.5, abs=F32_ATOL)
    assert load.var() / load.mean() ** 2 == pytest.approx(0.5)  # float64 check of the comment
    assert out.aux_loss.item() == pytest.approx(0.1 * cv2_importance + 0.2 * 0.5, abs=F32_ATOL)


def _noisy_router(seed=0, k=2, n_experts=6, d_model=5):
    torch.manual_seed(seed)
    router = build_router(NoisyTopKRouter(k=k, noise_epsilon=0.01), d_model=d_model, n_experts=n_experts, capacity=None)
    return router.train()


def test_noisy_topk_training_matches_paper_formula():
    router = _noisy_router()
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    out = router(x)
    torch.manual_seed(7)
    normal = torch.randn(12, 6)  # the module draws exactly this, first

    with torch.no_grad():
        clean = (x @ router.gate.weight.T).double()
        std = torch.nn.functional.softplus(x @ router.noise.weight.T).double() + 0.01
    noisy = clean + normal.double() * std
    top, idx = noisy.topk(2, dim=-1)
    assert out.expert_index_A.tolist() == idx.reshape(-1).tolist()
    torch.testing.assert_close(out.gate_A.double(), top.softmax(-1).reshape(-1), rtol=0, atol=F32_ATOL)

    # Appendix A, literally: kth_excluding(H, k, i) = k-th largest of H without component i.
    load = np.zeros(6)
    for t in range(12):
        for i in range(6):
            others = np.delete(noisy[t].numpy(), i)
            kth_excluding = np.sort(others)[::-1][2 - 1]
            load[i] += norm.cdf((clean[t, i].item() - kth_excluding) / std[t, i].item())
    cv2_load = load.var() / load.mean() ** 2
    # the module works in float32: relative error of a sum of 12 CDFs of float32 inputs ~1e-6
    assert out.losses["load"].item() == pytest.approx(cv2_load, rel=1e-4, abs=1e-6)
    assert out.aux_loss.requires_grad


def test_noisy_topk_losses_gradcheck_float64():
    router = _noisy_router(seed=3).double()
    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gate_w = router.gate.weight.detach().clone().requires_grad_(True)
    noise_w = router.noise.weight.detach().clone().requires_grad_(True)

    def losses(gate_w, noise_w):
        torch.manual_seed(0)  # the same noise on every evaluation
        out = torch.func.functional_call(router, {"gate.weight": gate_w, "noise.weight": noise_w}, (x,))
        return out.losses["importance"], out.losses["load"]

    # the smooth load is differentiable in both weight matrices (default float64 tolerances)
    assert torch.autograd.gradcheck(losses, (gate_w, noise_w))


# --- expert choice ------------------------------------------------------------------------


def test_expert_choice_takes_exactly_its_top_c_tokens():
    router = identity_router(ExpertChoiceRouter(), capacity=capacity_plan(1.0, eval_factor=2.0)).train()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(10))
    out = router(x)
    slots = 2  # ceil(1 * 8 / 4 * 1.0)
    scores = x.softmax(-1)
    assert out.priority_A is None
    assert out.tokens_per_expert_E.tolist() == [slots] * 4
    assert out.expert_index_A.tolist() == [e for e in range(4) for _ in range(slots)]  # expert-major
    for e in range(4):
        best = sorted(range(8), key=lambda t: -scores[t, e].item())[:slots]
        assert out.token_index_A[e * slots:(e + 1) * slots].tolist() == best
    # exact: the gates are these very softmax values, gathered
    torch.testing.assert_close(out.gate_A, scores[out.token_index_A, out.expert_index_A], rtol=0, atol=0)
    assert router.eval()(x).tokens_per_expert_E.tolist() == [4] * 4  # eval_factor 2.0


def test_expert_choice_capacity_capped_and_required():
    big = identity_router(ExpertChoiceRouter(), capacity=capacity_plan(10.0)).eval()  # eval: falls back to 10.0
    out = big(torch.randn(6, 4))
    assert out.tokens_per_expert_E.tolist() == [6] * 4  # C = 15 capped at T = 6
    assert sorted(out.token_index_A[:6].tolist()) == list(range(6))
    with pytest.raises(ValueError, match="capacity factor"):
        build_router(ExpertChoiceRouter(), d_model=4, n_experts=4, capacity=None)


# --- hash ---------------------------------------------------------------------------------


def test_hash_deterministic_and_seeded():
    ids = torch.arange(1000)
    a = build_router(HashRouter(seed=0), d_model=4, n_experts=8, capacity=None)
    b = build_router(HashRouter(seed=0), d_model=4, n_experts=8, capacity=None)
    c = build_router(HashRouter(seed=1), d_model=4, n_experts=8, capacity=None)
    x = torch.randn(1000, 4, requires_grad=True)
    out_a, out_b, out_c = (r(x, token_ids_T=ids) for r in (a, b, c))
    assert torch.equal(out_a.expert_index_A, out_b.expert_index_A)
    assert (out_a.expert_index_A != out_c.expert_index_A).float().mean() > 0.5  # a new mapping
    assert torch.equal(out_a.expert_index_A, hash_expert_index(ids, seed=0, n_experts=8))
    assert torch.all(out_a.gate_A == 1.0) and not out_a.gate_A.requires_grad
    assert sum(p.numel() for p in a.parameters()) == 0
    with pytest.raises(ValueError, match="token_ids_T"):
        a(x)


def test_hash_spreads_vocabulary_evenly():
    vocab, n_experts = 50257, 8
    counts = torch.bincount(hash_expert_index(torch.arange(vocab), seed=0, n_experts=n_experts), minlength=n_experts)
    expected = vocab / n_experts
    chi2 = ((counts.double() - expected) ** 2 / expected).sum().item()
    # chi-square with 7 degrees of freedom: P(chi2 > 24.3) = 1e-3 for a uniform random map
    assert chi2 < 24.3, counts.tolist()


# --- sigmoid bias (DeepSeek-V3) -----------------------------------------------------------


def test_sigmoid_bias_group_limiting_and_gates():
    plan = SigmoidBiasRouter(k=3, n_groups=4, topk_groups=2, scaling_factor=2.5)
    router = identity_router(plan, n_experts=8).eval()
    # groups (0,1) (2,3) (4,5) (6,7): the two best experts sit alone in groups 0 and 1, whose
    # top-2 sums (.96, .95) lose to groups 2 (1.22) and 3 (1.11).
    scores = torch.tensor([[0.95, 0.01, 0.94, 0.01, 0.62, 0.6, 0.56, 0.55]])
    out = router(torch.logit(scores))
    assert out.expert_index_A.tolist() == [4, 5, 6]
    chosen = torch.tensor([0.62, 0.6, 0.56])
    torch.testing.assert_close(out.gate_A, 2.5 * chosen / chosen.sum(), rtol=0, atol=F32_ATOL)
    torch.testing.assert_close(out.priority_A, chosen, rtol=0, atol=F32_ATOL)

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        router.expert_bias_E.copy_(torch.randn(8, generator=torch.Generator().manual_seed(12)) * 0.3)
    out = router(x)
    choice = (torch.sigmoid(x) + router.expert_bias_E).view(64, 4, 2).sum(-1)  # S = 2: top-2 = both
    kept = choice.topk(2, dim=-1).indices  # [T, 2]
    chosen_groups = (out.expert_index_A // 2).view(64, 3)
    for t in range(64):
        assert set(chosen_groups[t].tolist()) <= set(kept[t].tolist())


def test_sigmoid_bias_selects_but_does_not_gate():
    router = identity_router(SigmoidBiasRouter(k=1, normalize=False), n_experts=4).eval()
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    with torch.no_grad():
        router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # .27 + 1 beats .88
    out = router(x)
    assert out.expert_index_A.tolist() == [3]
    torch.testing.assert_close(out.gate_A, torch.sigmoid(torch.tensor([-1.0])), rtol=0, atol=F32_ATOL)


def test_sigmoid_bias_update_direction():
    rate = 0.001
    router = identity_router(SigmoidBiasRouter(k=1, bias_update_rate=rate), n_experts=4)
    model = nn.Sequential(nn.Identity(), router)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(13)) * 0.1 + torch.tensor([3.0, 0, 0, 0])
    router.train()
    router(x), router(x)  # two micro-batches accumulate
    assert router.load_since_update_E.tolist() == [16, 0, 0, 0]
    router.eval()(x)  # eval does not count
    assert router.load_since_update_E.tolist() == [16, 0, 0, 0]
    update_router_biases(model)
    # float32 +-0.001 is exact to its representation (rel 6e-8): compare at 1e-9
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-rate, rate, rate, rate]), rtol=0, atol=1e-9)
    assert router.load_since_update_E.tolist() == [0, 0, 0, 0]
    update_router_biases(model)  # nothing seen: sign(0) = 0, no change
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-rate, rate, rate, rate]), rtol=0, atol=1e-9)
    state = router.state_dict()
    assert "expert_bias_E" in state and "load_since_update_E" not in state
    assert not any(p is router.expert_bias_E for p in router.parameters())


def test_sigmoid_bias_rejects_unreachable_k():
    with pytest.raises(ValueError, match="kept groups"):
        build_router(SigmoidBiasRouter(k=5, n_groups=4, topk_groups=2), d_model=4, n_experts=8, capacity=None)


# --- all routers: precision and parameters ------------------------------------------------

ALL_PLANS = [
    TopKRouter(k=2, z_loss_coef=0.001), NoisyTopKRouter(k=2), SwitchRouter(jitter_eps=0.01), BaseRouter(),
    SinkhornRouter(z_loss_coef=0.001), ExpertChoiceRouter(), HashRouter(), SigmoidBiasRouter(k=2, n_groups=2),
    SparseMixerRouter(k=2, jitter_eps=0.2),
]


@pytest.mark.parametrize("plan", ALL_PLANS, ids=lambda p: p.type)
def test_router_math_is_float32_under_bf16_autocast(plan):
    torch.manual_seed(14)
    router = build_router(plan, d_model=16, n_experts=8, capacity=capacity_plan(1.25)).eval()
    x_bf16 = torch.randn(32, 16).to(torch.bfloat16)
    ids = torch.arange(32)
    reference = router(x_bf16.float(), token_ids_T=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x_bf16, token_ids_T=ids)
    assert out.gate_A.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    # autocast off inside the router: the same float32 kernels on the same values, bit for bit
    assert torch.equal(out.expert_index_A, reference.expert_index_A)
    torch.testing.assert_close(out.gate_A, reference.gate_A, rtol=0, atol=0)
    router.to(torch.bfloat16)  # bf16 weights are upcast too
    out = router(x_bf16, token_ids_T=ids)
    assert out.gate_A.dtype == torch.float32 and out.aux_loss.dtype == torch.float32


@pytest.mark.parametrize(
    "plan, expected",
    [(TopKRouter(), 16 * 8), (TopKRouter(bias=True), 16 * 8 + 8), (NoisyTopKRouter(), 2 * 16 * 8),
     (SwitchRouter(bias=True), 16 * 8 + 8), (BaseRouter(), 16 * 8), (SinkhornRouter(), 16 * 8),
     (ExpertChoiceRouter(), 16 * 8), (HashRouter(), 0), (SigmoidBiasRouter(k=2), 16 * 8), (SparseMixerRouter(bias=True), 16 * 8 + 8)],
    ids=lambda v: getattr(v, "type", str(v)),
)
def test_parameter_counts(plan, expected):
    router = build_router(plan, d_model=16, n_experts=8, capacity=capacity_plan(1.0))
    assert sum(p.numel() for p in router.parameters()) == expected


def test_update_router_biases_touches_only_sigmoid_bias_modules():
    topk = build_router(TopKRouter(), d_model=4, n_experts=4, capacity=None)
    sigmoid = build_router(SigmoidBiasRouter(k=1), d_model=4, n_experts=4, capacity=None)
    model = nn.ModuleList([topk, sigmoid])
    sigmoid.train()(torch.randn(5, 4))
    update_router_biases(model)
    assert isinstance(sigmoid, SigmoidBiasRouting) and sigmoid.expert_bias_E.abs().sum() > 0


@pytest.mark.parametrize("plan", ALL_PLANS, ids=lambda p: p.type)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_routers_run_on_meta_device(plan, training):
    """Full-size models are checked on the meta device: every router must produce shapes there."""
    with torch.device("meta"):
        router = build_router(plan, d_model=16, n_experts=8, capacity=capacity_plan(1.0)).train(training)
        out = router(torch.empty(32, 16), token_ids_T=torch.empty(32, dtype=torch.long))
    # expert choice: E * C = 8 * (32 / 8 * 1.0); token choice: T * K
    n_assignments = 8 * 4 if plan.type == "expert_choice" else 32 * plan.experts_per_token
    assert out.gate_A.shape == (n_assignments,)
    assert out.tokens_per_expert_E.shape == (8,) and out.aux_loss.shape == ()

