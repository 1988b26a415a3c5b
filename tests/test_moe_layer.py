"""MoE layer: every fast path against the slow oracle (forward and gradients), gradcheck,
dropping semantics, the meta device, parameter counts and the FLOP convention.

Shape legend: T tokens, D d_model, F expert d_ff, E experts, K experts per token, C capacity.
Sizes are tiny so that the whole file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from moespec.model.dispatch import plan_dispatch
from moespec.model.moe_layer import MoELayer, build_moe_layer
from moespec.spec.plan import (
    BaseRouter,
    CapacityPlan,
    ExpertChoiceRouter,
    ExpertsPlan,
    HashRouter,
    MoELayerPlan,
    NoisyTopKRouter,
    SigmoidBiasRouter,
    SinkhornRouter,
    SwitchRouter,
    TopKRouter,
)

D, F, E = 8, 6, 4


def capacity_plan(mode: str, factor: float = 0.5) -> CapacityPlan | None:
    """cf 0.5 with k tokens per expert on average: about half the assignments are dropped."""
    if mode == "base":
        return None
    if mode == "dropless":
        return CapacityPlan(factor=None, eval_factor=None, min_capacity=1, drop_policy="position", dropless=True)
    return CapacityPlan(factor=factor, eval_factor=2 * factor, min_capacity=1, drop_policy=mode, dropless=False)


def make_layer(router, mode: str, activation: str = "swiglu", *, shared: int = 0, dtype=torch.float64, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    plan = MoELayerPlan(
        router=router,
        experts=ExpertsPlan(count=E, d_ff=F, shared_count=shared, shared_d_ff=5, shared_gate=shared > 0),
        capacity=capacity_plan(mode),
    )
    # init_std 0.5: outputs of order 0.1-1 so that absolute tolerances mean something.
    return build_moe_layer(plan, d_model=D, activation=activation, layer_index=3, init_std=0.5).to(dtype)


def grads(layer: MoELayer, x: torch.Tensor, **kwargs):
    """(y, gradients of a fixed random projection of (y, aux) w.r.t. x and every parameter)."""
    torch.manual_seed(1234)  # same router noise (noisy_topk, switch jitter) for both paths
    y, stats, aux = layer(x, **kwargs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    loss = (y * dy).sum() + aux
    inputs = [x] + [p for p in layer.parameters()]
    return y, stats, torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_parity(layer, x, *, rtol, atol, **kwargs):
    y, stats, g = grads(layer, x, **kwargs)
    y_ref, stats_ref, g_ref = grads(layer, x, reference=True, **kwargs)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], g, g_ref):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}")
    assert torch.equal(stats.tokens_per_expert_E, stats_ref.tokens_per_expert_E)
    assert float(stats.dropped_fraction) == float(stats_ref.dropped_fraction)
    return stats


# float64 parity: both paths compute the same products, summed in a different order (bmm or
# per-group mm blocking, index_add order, gate folded before vs after the down projection), so
# they differ by a few ulps of float64: 1e-12 relative is ~5000 ulps, far above that and far
# below any indexing bug, which moves values by O(1).
F64 = dict(rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu", "gelu"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode", ["position", "probability", "dropless"])
def test_fast_path_matches_oracle(mode, k, activation):
    layer = make_layer(TopKRouter(k=k), mode, activation)
    x = torch.randn(2, 12, D, dtype=torch.float64, requires_grad=True)
    stats = assert_parity(layer, x, **F64)
    if mode == "dropless":
        assert float(stats.dropped_fraction) == 0.0
    else:  # C = ceil(k * 24 / 4 * 0.5) = 3k of 6k routed per expert on average: drops happen
        assert float(stats.dropped_fraction) > 0.0


def test_eval_uses_eval_factor_and_stays_in_parity():
    layer = make_layer(TopKRouter(k=2), "position").eval()
    assert layer.capacity(24) == math.ceil(2 * 24 / E * 1.0)  # eval_factor = 2 * 0.5
    layer.train()
    assert layer.capacity(24) == math.ceil(2 * 24 / E * 0.5)
    layer.eval()
    assert_parity(layer, torch.randn(24, D, dtype=torch.float64, requires_grad=True), **F64)


ROUTERS = [
    (TopKRouter(k=2), "position"),
    (NoisyTopKRouter(k=2), "probability"),
    (SwitchRouter(jitter_eps=0.01), "position"),
    (BaseRouter(), "base"),
    (SinkhornRouter(), "dropless"),
    (ExpertChoiceRouter(), "position"),
    (HashRouter(seed=3), "probability"),
    (SigmoidBiasRouter(k=2), "dropless"),
]


@pytest.mark.parametrize("router,mode", ROUTERS, ids=[r.type for r, _ in ROUTERS])
def test_every_router_through_both_paths(router, mode):
    layer = make_layer(router, mode, shared=2)
    x = torch.randn(2, 12, D, dtype=torch.float64, requires_grad=True)
    token_ids = torch.randint(0, 1000, (2, 12))
    stats = assert_parity(layer, x, token_ids=token_ids, **F64)
    assert stats.router == router.type and stats.layer == 3
    if isinstance(router, (BaseRouter, ExpertChoiceRouter)):
        assert float(stats.dropped_fraction) == 0.0  # balanced / exactly full by construction


def test_float32_parity():
    # float32: reassociated sums of D or F products differ by ~sqrt(n) * 6e-8 relative;
    # 1e-5 leaves a wide margin and still catches a wrong or missing term.
    for mode in ("position", "dropless"):
        layer = make_layer(TopKRouter(k=2), mode, dtype=torch.float32)
        assert_parity(layer, torch.randn(32, D, requires_grad=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["position", "probability", "dropless"])
def test_gradcheck(mode):
    """Finite differences on the whole layer in float64: router, experts, shared experts."""
    layer = make_layer(TopKRouter(k=2), mode, "swiglu", shared=1)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        y, _, aux = functional_call(layer, dict(zip(names, params)), (x,))
        return y, aux

    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    # Default gradcheck tolerances (atol 1e-5, rtol 1e-3 on float64 finite differences with
    # eps 1e-6). Routing is piecewise constant; the seeded inputs are far from a top-k tie.
    # fast_mode checks random projections of the Jacobian: seconds instead of a full Jacobian
    # column per parameter element, and a wrong entry still shows up in the projection.
    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


def test_dropped_tokens_output_zero():
    """All 16 tokens go to expert 0, which has C = 16 / 4 = 4 slots: tokens 4..15 drop."""
    layer = make_layer(SwitchRouter(), "position", dtype=torch.float32)
    layer.capacity_plan = CapacityPlan(factor=1.0, eval_factor=1.0, min_capacity=1, drop_policy="position", dropless=False)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0  # logit of expert 0: 10 * x[:, 0] ~ 50
    x = torch.randn(16, D)
    x[:, 0] = 5.0
    y, stats, _ = layer(x)
    assert stats.tokens_per_expert_E.tolist() == [16, 0, 0, 0]
    assert float(stats.dropped_fraction) == 12 / 16
    assert torch.all(y[4:] == 0)  # exactly zero: the residual carries them
    assert torch.all(y[:4].abs().sum(-1) > 0)


def test_capacity_forward_backward_on_meta():
    plan = MoELayerPlan(
        router=TopKRouter(k=8),
        experts=ExpertsPlan(count=64, d_ff=2048, shared_count=2, shared_d_ff=1024, shared_gate=True),
        capacity=capacity_plan("probability", factor=1.25),
    )
    with torch.device("meta"):
        layer = build_moe_layer(plan, d_model=4096, activation="swiglu", layer_index=0)
        x = torch.randn(4, 4096, 4096, requires_grad=True)  # 16k tokens: ~200 GB if it were real
    y, stats, aux = layer(x)
    (y.sum() + aux).backward()
    assert y.shape == x.shape and y.device.type == "meta"
    assert layer.experts.w_down.grad.shape == (64, 2048, 4096)
    assert stats.tokens_per_expert_E.shape == (64,)


def test_parameter_count_is_router_plus_experts_plus_shared():
    for activation, per_expert in (("swiglu", 3 * D * F), ("relu", 2 * D * F)):
        layer = make_layer(TopKRouter(k=2), "position", activation, shared=2)
        router = sum(p.numel() for p in layer.router.parameters())
        assert router == D * E  # W_r, no bias
        shared = (3 if activation == "swiglu" else 2) * D * 2 * 5 + D  # 2 shared experts + gate
        assert sum(p.numel() for p in layer.parameters()) == router + E * per_expert + shared


def training_step_flops(layer: MoELayer, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        y, _, aux = layer(x)
        (y.sum() + aux).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("activation,projections", [("swiglu", 3), ("gelu", 2)])
def test_flops_capacity_counts_padding(activation, projections):
    T, k = 40, 2
    layer = make_layer(TopKRouter(k=k), "position", activation, dtype=torch.float32)
    C = layer.capacity(T)  # ceil(2 * 40 / 4 * 0.5) = 10
    x = torch.randn(T, D, requires_grad=True)
    # Every matmul is 2*m*n*k; a training step runs each one 3 times (forward, grad input,
    # grad weight). Router: x @ W_r, [T, D] x [D, E]. Experts: `projections` matmuls on E*C
    # rows of [D] x [D, F] (padding included, whatever the routing).
    expected = 3 * 2 * T * D * E + 3 * projections * 2 * E * C * D * F
    assert training_step_flops(layer, x) == expected


@pytest.mark.parametrize("activation,projections", [("swiglu", 3), ("gelu", 2)])
def test_flops_dropless_counts_routed_rows(activation, projections):
    T, k = 40, 2
    layer = make_layer(TopKRouter(k=k), "dropless", activation, shared=1, dtype=torch.float32)
    x = torch.randn(T, D, requires_grad=True)
    shared_width = 5  # one shared expert of width 5, gated activation like the others
    expected = (
        3 * 2 * T * D * E  # router
        + 3 * projections * 2 * (T * k) * D * F  # exactly the T*k routed rows
        + 3 * projections * 2 * T * D * shared_width  # shared experts, every token
        + 3 * 2 * T * D * 1  # shared gate Linear(D, 1)
    )
    assert training_step_flops(layer, x) == expected


def test_bf16_autocast_matches_float32():
    for mode in ("position", "dropless"):
        layer = make_layer(TopKRouter(k=2), mode, dtype=torch.float32)
        x = torch.randn(32, D, requires_grad=True)
        y32, _, _ = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16, _, aux = layer(x)
            (y16.sum() + aux).backward()
        assert y16.dtype == torch.float32  # the residual stream keeps x's dtype
        assert layer.experts.w_up.grad.dtype == torch.float32
        # bf16 keeps 8 bits of mantissa (relative error 2^-9 per rounding) and each output goes
        # through three roundings of matmul inputs: 3% of the output scale is a loose bound.
        scale = y32.detach().abs().max()
        torch.testing.assert_close(y16, y32, rtol=0, atol=0.03 * float(scale))


def test_stats_are_detached_and_match_dispatch():
    layer = make_layer(TopKRouter(k=2), "position", dtype=torch.float32)
    x = torch.randn(24, D, requires_grad=True)
    y, stats, aux = layer(x)
    assert aux.dtype == torch.float32 and aux.shape == () and aux.requires_grad
    assert all(not v.requires_grad for v in stats.losses.values())
    route = layer.router(x)
    plan = plan_dispatch(route.expert_index_A, route.token_index_A, None, n_experts=E, capacity=layer.capacity(24))
    assert float(stats.dropped_fraction) == int(plan.dropped) / (24 * 2)
    assert int(stats.tokens_per_expert_E.sum()) == 24 * 2
    assert stats.as_floats()["layer"] == 3


def test_expert_bank_dropless_with_repeated_tokens_matches_oracle():
    """forward_dropless on arbitrary sorted assignments, a token repeated inside one expert's
    group too (index_add must sum them), gate None (weight 1) and an expert with no rows."""
    from moespec.model.experts import ExpertBank

    torch.manual_seed(0)
    bank = ExpertBank(n_experts=3, d_model=D, d_ff=F, activation="geglu", init_std=0.5).double()
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    expert_A = torch.tensor([0, 0, 0, 2, 2])  # expert 1 empty
    token_A = torch.tensor([4, 1, 4, 0, 4])
    gate_A = torch.rand(5, dtype=torch.float64, requires_grad=True)
    for gates in (gate_A, None):
        y = bank.forward_dropless(x, token_A, gates, [3, 0, 2])
        ones = torch.ones(5, dtype=torch.float64)
        y_ref = bank.reference_forward(x, token_A, expert_A, ones if gates is None else gates)
        dy = torch.randn_like(y)
        inputs = [x, *bank.parameters()] + ([gate_A] if gates is not None else [])
        g = torch.autograd.grad((y * dy).sum(), inputs)
        g_ref = torch.autograd.grad((y_ref * dy).sum(), inputs)
        torch.testing.assert_close(y, y_ref, **F64)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, **F64)
    assert torch.all(g[2][1] == 0)  # g = (x, w_gate, w_up, w_down): empty expert 1 gets exactly 0


def test_expert_bank_grouped_rows_in_order():
    """forward_grouped: rows already sorted by expert, out[a] = expert(x[a])."""
    from moespec.model.experts import ExpertBank

    bank = ExpertBank(n_experts=3, d_model=D, d_ff=F, activation="relu").double()
    x = torch.randn(6, D, dtype=torch.float64)
    out = bank.forward_grouped(x, [2, 3, 1])
    expected = torch.cat([bank.expert_forward(0, x[:2]), bank.expert_forward(1, x[2:5]), bank.expert_forward(2, x[5:])])
    torch.testing.assert_close(out, expected, **F64)
    with pytest.raises(ValueError, match="group sizes"):
        bank.forward_grouped(x, [2, 3])


def test_base_with_T_not_a_multiple_of_E_pads_its_groups_to_one_bmm_and_matches_the_oracle():
    """22 tokens over 4 experts: the auction fills 24 slots (2 with padding) and the padding is
    dropped, leaving groups of 5 and 6. The fast path pads them back (token 0, gate 0): one
    bmm per projection on [4, 6, .], FLOPs of the 24 rows, outputs and every gradient equal to
    the per-expert oracle's."""
    from moespec.model import group_matmuls

    layer = make_layer(BaseRouter(), "base")
    x = torch.randn(2, 11, D, dtype=torch.float64, requires_grad=True)
    chosen = []
    engine = group_matmuls.engine

    def spy(counts_E, w_EKN):
        chosen.append((list(counts_E), engine(counts_E, w_EKN)))
        return chosen[-1][1]

    group_matmuls.engine = spy
    try:
        stats = assert_parity(layer, x, **F64)
        with FlopCounterMode(display=False) as counter:
            y, _, aux = layer(x)
            (y.sum() + aux).backward()
    finally:
        group_matmuls.engine = engine
    assert chosen and all(counts == [6, 6, 6, 6] and how == "batched" for counts, how in chosen), chosen
    assert sorted(stats.tokens_per_expert_E.tolist()) != [6, 6, 6, 6] and int(stats.tokens_per_expert_E.sum()) == 22
    bmm = counter.get_flop_counts()["Global"][torch.ops.aten.bmm]
    assert bmm == 18 * 24 * D * F  # 3 projections, forward and two backward products each, on 24 rows
