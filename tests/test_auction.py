"""The BASE balanced-assignment auction against scipy's exact solver and its own certificate.

The oracle (REFERENCE.md sec. 1): `scipy.optimize.linear_sum_assignment` on the [T, T] matrix
with every expert column repeated T/E times. The auction promises exact balance and a total
within T * eps of that optimum; the final prices are a dual certificate of the same bound, which
lets the bench-sized case be checked without scipy.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize as scipy_optimize  # a test dependency (pyproject's `test` extra): never skipped

from moespec.model.auction import AuctionResult, auction_assignment, balanced_assignment
from moespec.model.balanced_routers import padded_scores


def scipy_optimum(scores_TE: torch.Tensor) -> float:
    """Exact maximum of sum_t scores[t, e(t)] over balanced assignments, in float64."""
    T, E = scores_TE.shape
    slots_TT = scores_TE.double().cpu().numpy().repeat(T // E, axis=1)
    rows, cols = scipy_optimize.linear_sum_assignment(slots_TT, maximize=True)
    return float(slots_TT[rows, cols].sum())


def total(scores_TE: torch.Tensor, expert_index_T: torch.Tensor) -> float:
    return float(scores_TE.double().cpu().gather(1, expert_index_T.cpu().view(-1, 1)).sum())


def make_scores(kind: str, T: int, E: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(T, E, generator=generator)
    if kind == "router":  # x @ W affinities, as a BASE layer sees them
        return torch.randn(T, 32, generator=generator) @ torch.randn(32, E, generator=generator)
    if kind == "integers":  # many exact ties
        return torch.randint(0, 4, (T, E), generator=generator).float()
    if kind == "offset":  # large common offset: precision must come from the row shift
        return 1000.0 + torch.rand(T, E, generator=generator)
    if kind == "constant":
        return torch.full((T, E), 3.0)
    raise ValueError(kind)


def rounding_slack(scores_TE: torch.Tensor, result: AuctionResult) -> float:
    """float32 prices carry ~2**-24 of the spread per operation; a few ulps per token over T
    tokens, far below T * eps (>= T * spread * 2**-16 in float32)."""
    spread = float((scores_TE.amax(1) - scores_TE.amin(1)).max()) or 1.0
    return 64 * scores_TE.shape[0] * spread * 2.0**-24


def assert_balanced(expert_index_T: torch.Tensor, E: int) -> None:
    T = expert_index_T.numel()
    assert expert_index_T.dtype == torch.long and expert_index_T.shape == (T,)
    assert torch.bincount(expert_index_T.cpu(), minlength=E).tolist() == [T // E] * E


def assert_near_optimum(scores_TE: torch.Tensor, result: AuctionResult) -> None:
    """optimum - T * eps <= total <= optimum, against scipy."""
    optimum = scipy_optimum(scores_TE)
    achieved = total(scores_TE, result.expert_index_T)
    assert achieved >= optimum - result.optimality_bound - rounding_slack(scores_TE, result)
    # float64 sums of the same numbers in another order: their error scales with the terms'
    # magnitudes, not with the total (1.0 - 1.0 - 1e-38 may sum to 0.0 or to -1e-38)
    assert achieved <= optimum + 1e-9 * float(scores_TE.double().abs().sum())


def assert_certificate(scores_TE: torch.Tensor, result: AuctionResult) -> None:
    """eps-CS for every token at the final prices, and the weak-duality bound it implies:
    dual(price) = sum_t max_e (s - price) + M * sum price >= optimum >= total >= dual - T*eps."""
    T, E = scores_TE.shape
    scores64_TE = scores_TE.double().cpu()
    price_E = result.price_E.double().cpu()
    value_TE = scores64_TE - price_E
    own_T = value_TE.gather(1, result.expert_index_T.cpu().view(-1, 1)).squeeze(1)
    slack = rounding_slack(scores_TE, result)
    assert (own_T >= value_TE.amax(1) - result.eps - slack / T).all()
    dual = float(value_TE.amax(1).sum() + (T // E) * price_E.sum())
    assert total(scores_TE, result.expert_index_T) >= dual - result.optimality_bound - slack


@pytest.mark.parametrize(
    "T,E", [(0, 4), (1, 1), (16, 1), (8, 8), (64, 64), (96, 4), (300, 3), (1024, 32)]
)
def test_every_expert_gets_exactly_T_over_E(T, E):
    result = auction_assignment(make_scores("normal", T, E, seed=T + E))
    assert_balanced(result.expert_index_T, E)


@pytest.mark.parametrize("kind", ["normal", "router", "integers", "offset", "constant"])
@pytest.mark.parametrize("T,E", [(8, 8), (64, 64), (128, 8), (240, 3), (512, 16)])
def test_within_T_eps_of_scipy_optimum(kind, T, E):
    scores_TE = make_scores(kind, T, E, seed=3 * T + E)
    result = auction_assignment(scores_TE)
    assert_balanced(result.expert_index_T, E)
    assert_near_optimum(scores_TE, result)
    assert_certificate(scores_TE, result)


def test_router_scores_land_far_closer_than_the_bound():
    # The bound T * eps is a worst case; on router-like scores the auction ends within a tiny
    # fraction of it (gap/bound measured 5e-4 here; the assertion leaves 20x headroom).
    scores_TE = make_scores("router", 1024, 32, seed=11)
    result = auction_assignment(scores_TE)
    gap = scipy_optimum(scores_TE) - total(scores_TE, result.expert_index_T)
    assert 0 <= gap + 1e-6 and gap <= 0.01 * result.optimality_bound


def test_eps_below_one_over_T_is_exact_on_integer_scores():
    # Integer totals differ by >= 1, and T * eps < 1, so the auction must hit the optimum.
    scores_TE = make_scores("integers", 96, 6, seed=5) * 7
    result = auction_assignment(scores_TE, eps=0.5 / 96)
    assert total(scores_TE, result.expert_index_T) == scipy_optimum(scores_TE)


def test_certificate_at_bench_size():
    # T=4096, E=64, as in bench/base_solver.py; checked by the dual certificate, no scipy.
    scores_TE = make_scores("router", 4096, 64, seed=0)
    result = auction_assignment(scores_TE)
    assert_balanced(result.expert_index_T, 64)
    assert_certificate(scores_TE, result)


def test_default_eps_rule():
    scores_TE = make_scores("normal", 64, 8, seed=2)
    spread = float((scores_TE.amax(1) - scores_TE.amin(1)).max())
    assert auction_assignment(scores_TE).eps == pytest.approx(spread / 4096, rel=1e-6)
    assert auction_assignment(scores_TE, eps=0.25).eps == 0.25


@pytest.mark.parametrize("max_rounds", [0, 1, 3])
def test_out_of_rounds_still_balanced_and_within_bound(max_rounds):
    # max_rounds caps the bidding; augmenting paths place the rest and keep the guarantee.
    scores_TE = make_scores("normal", 64, 8, seed=9)
    result = auction_assignment(scores_TE, max_rounds=max_rounds)
    assert result.rounds <= max_rounds
    assert_balanced(result.expert_index_T, 8)
    assert_near_optimum(scores_TE, result)
    assert_certificate(scores_TE, result)


@pytest.mark.parametrize("T,E", [(10, 4), (7, 2), (3, 5)])
def test_T_not_multiple_of_E_is_a_clear_error(T, E):
    with pytest.raises(ValueError, match=rf"T={T} tokens, E={E} experts"):
        balanced_assignment(torch.zeros(T, E))


@pytest.mark.parametrize(
    "scores, eps, message",
    [
        (torch.zeros(8), None, "must be \\[T, E\\]"),
        (torch.zeros(8, 0), None, "at least one expert"),
        (torch.zeros(8, 4, dtype=torch.long), None, "float tensor"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), None, "inf or nan"),
        (torch.tensor([[0.0, float("-inf")], [1.0, 2.0]]), None, "inf or nan"),
        (torch.zeros(8, 4), 0.0, "eps must be positive"),
    ],
)
def test_bad_arguments(scores, eps, message):
    with pytest.raises(ValueError, match=message):
        balanced_assignment(scores, eps=eps)


@pytest.mark.parametrize("kind", ["router", "integers", "constant"])
def test_deterministic(kind):
    scores_TE = make_scores(kind, 512, 16, seed=4)
    first = balanced_assignment(scores_TE)
    assert torch.equal(first, balanced_assignment(scores_TE.clone()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_float_dtypes(dtype):
    scores_TE = make_scores("router", 256, 16, seed=8).to(dtype)
    result = auction_assignment(scores_TE)
    assert result.price_E.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_balanced(result.expert_index_T, 16)
    assert_near_optimum(scores_TE, result)  # of the rounded scores actually given


def test_tiny_eps_switches_to_float64():
    scores_TE = make_scores("normal", 64, 4, seed=12)
    result = auction_assignment(scores_TE, eps=1e-9)  # below float32 resolution of the spread
    assert result.price_E.dtype == torch.float64
    assert total(scores_TE, result.expert_index_T) >= scipy_optimum(scores_TE) - 64e-9 - 1e-9


def test_no_autograd_graph():
    scores_TE = make_scores("normal", 32, 4, seed=1).requires_grad_()
    expert_index_T = balanced_assignment(scores_TE * 2)
    assert expert_index_T.grad_fn is None and not expert_index_T.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_balanced_within_bound_and_deterministic():
    scores_TE = make_scores("router", 4096, 64, seed=0)
    result = auction_assignment(scores_TE.cuda())
    assert result.expert_index_T.is_cuda
    assert_balanced(result.expert_index_T, 64)
    assert_certificate(scores_TE, result)
    assert torch.equal(result.expert_index_T, balanced_assignment(scores_TE.cuda()))


@settings(max_examples=50, deadline=None)
@given(
    E=st.integers(1, 6),
    M=st.integers(1, 6),
    data=st.data(),
)
def test_property_small_problems(E, M, data):
    T = E * M
    values = data.draw(
        st.lists(
            st.one_of(st.integers(-3, 3).map(float), st.floats(-100, 100, width=32)),
            min_size=T * E, max_size=T * E,
        )
    )
    scores_TE = torch.tensor(values, dtype=torch.float32).view(T, E)
    result = auction_assignment(scores_TE)
    assert_balanced(result.expert_index_T, E)
    assert_near_optimum(scores_TE, result)
    if E > 1:  # E == 1 returns without prices
        assert_certificate(scores_TE, result)


@pytest.mark.parametrize("start", ["previous", "random", "huge"])
def test_warm_start_keeps_balance_and_the_bound(start):
    """Any starting prices give an exactly balanced assignment within T * eps of the optimum
    (the cold solve's total is a lower bound on the optimum); the previous solution's prices
    on the same scores need no more rounds than a cold start."""
    T, E = 512, 16
    scores_TE = make_scores("normal", T, E, seed=3)
    cold = auction_assignment(scores_TE)
    price_E = {"previous": cold.price_E, "random": torch.randn(E, generator=torch.Generator().manual_seed(1)),
               "huge": torch.linspace(0, 1e4, E)}[start]  # fmt: skip
    warm = auction_assignment(scores_TE, price_init_E=price_E)
    assert torch.bincount(warm.expert_index_T, minlength=E).tolist() == [T // E] * E
    total = lambda r: float(scores_TE.double().gather(1, r.expert_index_T.view(-1, 1)).sum())  # noqa: E731
    assert total(warm) >= total(cold) - cold.optimality_bound - warm.optimality_bound
    if start == "previous":
        assert warm.rounds + warm.augmentations <= cold.rounds + cold.augmentations


def test_base_router_warm_starts_from_its_last_prices():
    from moespec.model.balanced_routers import BaseRouting

    torch.manual_seed(0)
    router = BaseRouting(d_model=8, n_experts=4, auction_eps=None).train()
    assert torch.isnan(router.auction_price_E).all()  # cold until the first training step
    x_TD = torch.randn(64, 8)
    router(x_TD)
    first = router.auction_price_E.clone()
    assert torch.isfinite(first).all() and "auction_price_E" in router.state_dict()
    router.eval()(x_TD)
    assert torch.equal(router.auction_price_E, first)  # eval routes by argmax: prices untouched


@pytest.mark.parametrize("seed", range(4))
def test_host_shortest_paths_equal_dijkstra_and_form_a_tree(seed):
    """The augmentations' Bellman-Ford on the host: distances from the source edges equal a
    textbook Dijkstra's (heap, float64) over the same graph, and every predecessor lies on a
    shortest path, so the path the auction follows is a shortest one."""
    import heapq

    import numpy as np

    from moespec.model.auction import _shortest_paths

    rng = np.random.default_rng(seed)
    E = 48
    cost_EE = rng.exponential(1.0, (E, E)).astype(np.float32)
    cost_EE[rng.random((E, E)) < 0.05] = 0.0  # eps-CS leaves zero-cost moves: ties
    source_E = rng.exponential(3.0, E).astype(np.float32)
    given_E = source_E.copy()
    dist_E, pred = _shortest_paths(cost_EE, source_E)
    assert np.array_equal(source_E, given_E)  # the caller's distances are not written
    expected = [float(d) for d in source_E]
    heap, done = [(d, k) for k, d in enumerate(expected)], set()
    heapq.heapify(heap)
    while heap:
        d, j = heapq.heappop(heap)
        if j in done:
            continue
        done.add(j)
        for k in range(E):
            if d + float(cost_EE[j, k]) < expected[k]:
                expected[k] = d + float(cost_EE[j, k])
                heapq.heappush(heap, (expected[k], k))
    np.testing.assert_allclose(dist_E, expected, rtol=1e-5)
    assert (dist_E < source_E).sum() > E // 2  # most experts are reached through others
    for k, j in enumerate(pred):
        reached = source_E[k] if j < 0 else dist_E[j] + cost_EE[j, k]
        assert reached == pytest.approx(dist_E[k], rel=1e-6), (k, j)


@pytest.mark.parametrize(
    ("kind", "T", "E", "eps"),
    [("router", 4096, 256, None), ("router", 2016, 48, None), ("normal", 512, 16, None),
     ("integers", 96, 8, None), ("offset", 240, 6, None), ("router", 1024, 32, 1e-7)],  # 1e-7: float64
)
def test_numpy_rounds_match_the_torch_rounds(kind, T, E, eps):
    """On CPU the bidding rounds and augmentations run in numpy (auction_host); elsewhere the
    torch ones run. Both must pick the same assignment, to the bit the same prices, after the
    same number of rounds: only then does the CUDA path inherit the CPU path's tests."""
    from moespec.model import auction_host, auction_kernels

    scores_TE = make_scores(kind, T, E, seed=T + E)
    auction_kernels.COMPILED["enabled"] = False  # numpy against torch; the compiled ones are checked below
    try:
        host = auction_assignment(scores_TE, eps=eps)
        auction_host.HOST_ROUNDS["enabled"] = False
        device = auction_assignment(scores_TE, eps=eps)
    finally:
        auction_host.HOST_ROUNDS["enabled"] = True
        auction_kernels.COMPILED["enabled"] = True
    assert host.rounds > 0 and host.augmentations > 0  # both halves of the solver ran
    assert torch.equal(host.expert_index_T, device.expert_index_T)
    assert torch.equal(host.price_E, device.price_E) and host.price_E.dtype == device.price_E.dtype
    assert (host.rounds, host.augmentations, host.phases) == (device.rounds, device.augmentations, device.phases)
    assert_balanced(host.expert_index_T, E)


@pytest.mark.parametrize(("T", "E"), [(1201, 48), (1224, 48), (777, 160), (333, 10), (1030, 16)])
def test_padded_groups_within_bound_of_the_rectangular_optimum(T, E):
    """T % E != 0: `balanced_expert_index` pads with constant rows, which take the slots the
    real tokens leave. Against scipy on the [T, E * M] problem (M = ceil(T / E) slots per
    expert, no padding): at most M tokens per expert, every token placed, and the total within
    the padded solve's bound, cold and then warm-started from its prices."""
    from moespec.model.balanced_routers import balanced_expert_index

    M = -(-T // E)
    scores_TE = make_scores("router", T, E, seed=T + E)
    slots_TS = scores_TE.double().numpy().repeat(M, axis=1)
    rows, cols = scipy_optimize.linear_sum_assignment(slots_TS, maximize=True)
    optimum = float(slots_TS[rows, cols].sum())
    spread = float((scores_TE.amax(1) - scores_TE.amin(1)).max())
    bound = E * M * spread / 4096 + 64 * E * M * spread * 2.0**-24  # T' * eps, and float32 rounding
    price_E = None
    for _ in range(2):
        expert_index_T, price_E = balanced_expert_index(scores_TE, eps=None, price_init_E=price_E)
        counts = torch.bincount(expert_index_T, minlength=E)
        assert counts.sum() == T and counts.max() <= M
        assert optimum - bound <= total(scores_TE, expert_index_T) <= optimum + 1e-9 * abs(optimum)


def test_augmenting_paths_share_their_searches():
    """Filler rows are indifferent between experts, and each needs an augmenting path: one
    shortest-path search now serves several (auction_host.augment_all), and the result still
    carries the eps-CS certificate. At T 4001, E 160 (159 filler rows) it took 145 searches."""
    E = 160
    scores_TE = make_scores("router", 25 * E + 1, E, seed=5)
    padded_TE = padded_scores(scores_TE)  # E - 1 rows of zeros, as balanced_expert_index pads
    result = auction_assignment(padded_TE)
    assert result.augmentations >= 100  # the filler went through augmenting paths
    assert result.searches <= result.augmentations / 4
    assert_balanced(result.expert_index_T, E)
    assert_certificate(padded_TE, result)

