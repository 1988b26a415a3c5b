"""The BASE auction's compiled kernels (moespec/model/_auction_c.c, _auction_paths.h) against the
numpy solver they replace on the host: the same assignments, prices and counts to the bit, and
a loader that never calls a library it was not built for. The solver's own guarantees (balance,
the bound against scipy) are tests/test_auction.py's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_auction import assert_certificate, make_scores

from moespec.model.auction import AuctionResult, auction_assignment
from moespec.model.balanced_routers import padded_scores


def solve_both_rounds(scores_TE: torch.Tensor, **kwargs) -> tuple[AuctionResult, AuctionResult]:
    """The auction with the compiled round (auction_kernels), then with the numpy round."""
    from moespec.model import auction_kernels

    compiled = auction_assignment(scores_TE, **kwargs)
    auction_kernels.COMPILED["enabled"] = False
    try:
        numpy_round = auction_assignment(scores_TE, **kwargs)
    finally:
        auction_kernels.COMPILED["enabled"] = True
    return compiled, numpy_round


def assert_same_solve(a: AuctionResult, b: AuctionResult) -> None:
    assert torch.equal(a.expert_index_T, b.expert_index_T)
    assert torch.equal(a.price_E, b.price_E) and a.price_E.dtype == b.price_E.dtype
    assert (a.rounds, a.augmentations, a.searches, a.phases) == (b.rounds, b.augmentations, b.searches, b.phases)


def test_the_compiled_round_is_built():
    """`make test` installs with gcc on PATH, so the kernel must be there: without it every BASE
    layer silently runs the numpy round, 2x slower, and the parity tests below would compare
    the numpy round with itself."""
    from moespec.model import auction_kernels

    assert auction_kernels.available(), "moespec/model/_auction_c.c was not built: pip install -e . with a C compiler"


@pytest.mark.parametrize(
    ("kind", "T", "E", "eps"),
    [("router", 4096, 256, None), ("router", 2016, 48, None), ("normal", 512, 16, None),
     ("integers", 96, 8, None), ("integers", 1024, 32, None), ("offset", 240, 6, None),
     ("router", 1024, 32, 1e-7), ("normal", 768, 12, 0.5)],  # 1e-7: float64; 0.5: one coarse phase
)
def test_compiled_round_matches_the_numpy_round(kind, T, E, eps):
    """The compiled round (and its releases, with their cache of each token's best other
    expert) is the numpy round to the bit: same assignment, prices and counts."""
    scores_TE = make_scores(kind, T, E, seed=T + E + 1)
    compiled, numpy_round = solve_both_rounds(scores_TE, eps=eps)
    assert compiled.rounds > 0
    assert_same_solve(compiled, numpy_round)
    assert_certificate(scores_TE, compiled)


def test_compiled_round_matches_with_warm_prices_and_filler():
    """A BASE router's steps: fresh tokens, the previous step's prices, filler rows (T % E != 0)."""
    E, price_E = 48, None
    for step in range(3):
        padded_TE = padded_scores(make_scores("router", 1201, E, seed=step))
        compiled, numpy_round = solve_both_rounds(padded_TE, price_init_E=price_E)
        assert_same_solve(compiled, numpy_round)
        price_E = compiled.price_E


@settings(max_examples=60, deadline=None)
@given(E=st.integers(2, 7), M=st.integers(1, 5), data=st.data())
def test_property_compiled_round_matches_on_ties(E, M, data):
    """Small problems full of exact ties (integers), where first-maximum and column-order rules
    decide everything."""
    T = E * M
    values = data.draw(st.lists(st.integers(-2, 2), min_size=T * E, max_size=T * E))
    scores_TE = torch.tensor(values, dtype=torch.float32).view(T, E)
    compiled, numpy_round = solve_both_rounds(scores_TE)
    assert_same_solve(compiled, numpy_round)


def test_a_stale_kernel_build_is_not_loaded(tmp_path, monkeypatch):
    """A library left by an older checkout (its ABI number differs) must not be called with
    today's arguments: the loader refuses it and the numpy solver runs."""
    import subprocess

    from moespec.model import auction_kernels

    source = tmp_path / "stale.c"
    source.write_text("int moespec_auction_abi(void) { return -1; }\n")
    library = tmp_path / "stale.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    monkeypatch.setattr(auction_kernels, "_library_path", lambda: library)
    assert auction_kernels._load() is None
    monkeypatch.setattr(auction_kernels, "_library_path", lambda: None)
    assert auction_kernels._load() is None  # not built at all
