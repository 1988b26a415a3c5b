"""The thread engine's fp32 products on oneDNN (model/cpu_gemm.py): the same numbers as mm in
every product form, a bounded set of shapes handed to oneDNN whatever the group sizes, the
dropless kernel's outputs and gradients equal to the loop's when its groups run there, and
MOESPEC_CPU_GEMM honoured or refused in one line."""

from __future__ import annotations

import pytest
import torch

from cli_here import run_here
from moespec.model import cpu_gemm, group_matmuls, grouped_experts
from test_grouped_gemm import _run, routed_bank

pytestmark = pytest.mark.skipif(not cpu_gemm._runs(), reason="this torch has no oneDNN inner product")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 and 32 rows (16-row alignment), so that tiny problems cross chunks and pad
    tails; every product goes to oneDNN; the choice is restored after the test."""
    monkeypatch.setattr(cpu_gemm, "CHUNKS", (64, 32))
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    shapes = []
    linear = cpu_gemm._linear
    monkeypatch.setattr(cpu_gemm, "_linear", lambda x, w: shapes.append((tuple(x.shape), tuple(w.shape))) or linear(x, w))
    yield shapes
    cpu_gemm.force(None)


@pytest.mark.parametrize("rows, calls", [(1, 1), (15, 1), (16, 1), (33, 2), (70, 2), (127, 3), (160, 3)])
def test_every_product_form_equals_float64_mm(rows, calls, small_chunks):
    torch.manual_seed(rows)
    a_MK, w_KN = torch.randn(rows, 24), torch.randn(24, 40)
    w_NK_view = torch.randn(40, 24).t()  # the backward's w^T: a strided view
    g_MN, into_MN = torch.randn(rows, 40), torch.randn(rows, 40)
    f64 = torch.float64
    for w in (w_KN, w_NK_view):
        out_MN = torch.full((rows, 40), float("nan"))
        torch.testing.assert_close(cpu_gemm.times_into(a_MK, w, out_MN, min_flops=0).double(), a_MK.double() @ w.double(), rtol=1e-5, atol=1e-5)
        added = cpu_gemm.times_into(a_MK, w, into_MN.clone(), add=True, min_flops=0)
        torch.testing.assert_close(added.double(), into_MN.double() + a_MK.double() @ w.double(), rtol=1e-5, atol=1e-5)
    grad_KN = cpu_gemm.weight_grad_into(a_MK, g_MN, torch.full((24, 40), float("nan")), min_flops=0)
    torch.testing.assert_close(grad_KN.to(f64), a_MK.to(f64).t() @ g_MN.to(f64), rtol=1e-5, atol=1e-4)
    assert len(small_chunks) == 5 * calls  # every call went to oneDNN, one per chunk (127 rows: 64 + 32 + a padded 31)


def test_onednn_sees_a_bounded_set_of_row_counts(small_chunks):
    """Whatever the group sizes, oneDNN is handed the chunk sizes and, below the smallest,
    multiples of ALIGN: each is one primitive, built once and kept."""
    w_KN = torch.randn(8, 8)
    for rows in range(1, 200):
        a_MK = torch.randn(rows, 8)
        cpu_gemm.times_into(a_MK, w_KN, torch.empty(rows, 8), min_flops=0)
        cpu_gemm.weight_grad_into(a_MK, torch.randn(rows, 8), torch.empty(8, 8), min_flops=0)
    row_counts = {x[0] for x, _ in small_chunks if x[0] != 8} | {x[1] for x, _ in small_chunks if x[0] == 8}
    assert row_counts == {16, 32, 64}
    assert [(a, b, p) for a, b, p in cpu_gemm._chunks(127)] == [(0, 64, 64), (64, 96, 32), (96, 127, 32)]


def test_small_products_stay_on_mm(small_chunks):
    a_MK, w_KN = torch.randn(4, 8), torch.randn(8, 8)
    out = cpu_gemm.times_into(a_MK, w_KN, torch.empty(4, 8), min_flops=10**9)
    torch.testing.assert_close(out, a_MK @ w_KN)
    assert small_chunks == []


def _threaded(bank, x_TD, token_A, gate_A, counts: list[int], choice: str) -> list[torch.Tensor]:
    """The bank's outputs and gradients on the thread engine (two threads), products on `choice`."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cpu_gemm.force(choice)
        assert group_matmuls.engine(counts, bank.w_up) == "threads"
        return _run(bank, x_TD, token_A, gate_A, counts, grouped=True)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("gate_up", [True, False], ids=["gate-up-one-product", "gate-up-apart"])
@pytest.mark.parametrize("counts", [[9, 0, 40, 3, 5], [2, 0, 1, 2, 60, 1, 0, 3, 1, 2, 9]], ids=["groups", "bundles"])
@pytest.mark.parametrize("bias", [False, True], ids=["gated", "biases-clamped"])
def test_the_dropless_kernel_on_onednn_gives_the_loops_gradients(bias, counts, gate_up, small_chunks, monkeypatch):
    """The thread engine with oneDNN products (forced, with chunks small enough that a 40- or
    60-row group crosses two and every group pads; in bundles of small groups too), its gate
    and up products as one [D, 2F] product or apart: outputs and every gradient equal the
    loop's."""
    monkeypatch.setitem(grouped_experts.GATE_UP, "max_f", 24 if gate_up else 0)  # the bank's d_ff is 24
    bank, x_TD, token_A, gate_A = routed_bank(counts, 64, bias, seed=7)

    onednn = _threaded(bank, x_TD, token_A, gate_A, counts, "onednn")
    calls = len(small_chunks)
    mkl = _threaded(bank, x_TD, token_A, gate_A, counts, "mkl")
    loop = _run(bank, x_TD, token_A, gate_A, counts, grouped=False)
    products = 6 if gate_up else 9  # a group's: forward 2 or 3, backward 4 or 6
    assert calls >= products * sum(n > 0 for n in counts) and len(small_chunks) == calls  # (+1 for 2 chunks); none under "mkl"
    stacked = {w for _, w in small_chunks[:calls]} & {(48, 16), (16, 48)}  # [w_gate | w_up] or its transpose, as oneDNN's weight
    assert bool(stacked) == gate_up
    for a, b, c in zip(onednn, mkl, loop, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)


def test_gate_and_up_as_one_product_in_bundles_of_grouped_gemms(monkeypatch):
    """Small groups in bundles whose products are one `_grouped_mm` each (products under
    MIN_FLOPS), on the oneDNN choice with gate and up stacked: the loop's outputs and gradients."""
    if not group_matmuls.grouped_gemm_available(torch.empty(2, 16, 24)):
        pytest.skip("torch._grouped_mm does not run here")
    monkeypatch.setitem(grouped_experts.GATE_UP, "max_f", 24)
    counts = [20 + (7 * e) % 11 for e in range(48)]  # 1,200 rows: bundles of 2-3 groups (group_threads.pieces caps them at 1/16 of the rows)
    counts[5] = 0
    bank, x_TD, token_A, gate_A = routed_bank(counts, 64, False, seed=3)
    weights = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs=None: weights.append(tuple(b.shape[1:])) or real(a, b, offs=offs))
    try:
        stacked = _threaded(bank, x_TD, token_A, gate_A, counts, "onednn")
    finally:
        cpu_gemm.force(None)
    assert (16, 48) in weights and (48, 16) in weights  # the forward's [D, 2F] and the input gradient's [2F, D]
    for a, b in zip(stacked, _run(bank, x_TD, token_A, gate_A, counts, grouped=False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_takes_onednn_only_where_the_probe_finds_it_faster(monkeypatch):
    try:
        monkeypatch.setattr(cpu_gemm, "_probe", lambda: 2.0)
        cpu_gemm.force("auto")
        assert cpu_gemm.backend() == "onednn" and cpu_gemm.use_onednn(torch.ones(1))
        assert not cpu_gemm.use_onednn(torch.ones(1, dtype=torch.bfloat16))  # bf16 mm is oneDNN in torch already
        monkeypatch.setattr(cpu_gemm, "_probe", lambda: 1.1)
        cpu_gemm.force("auto")
        assert cpu_gemm.backend() == "mkl"
        monkeypatch.setenv("MOESPEC_CPU_GEMM", "onednn")
        cpu_gemm.force(None)
        assert cpu_gemm.backend() == "onednn"
        assert 0.1 < cpu_gemm._probe() < 20  # the real probe: a ratio of two timings
    finally:
        cpu_gemm.force(None)


def test_a_bad_choice_is_one_line_and_exit_2(monkeypatch):
    monkeypatch.setenv("MOESPEC_CPU_GEMM", "fastest")
    with pytest.raises(ValueError, match="use auto, mkl or onednn"):
        cpu_gemm.requested()
    result = run_here("validate", "specs/mixtral-8x7b.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: MOESPEC_CPU_GEMM='fastest' is not a CPU GEMM choice: use auto, mkl or onednn"]
    monkeypatch.setenv("MOESPEC_CPU_GEMM", "MKL")  # case and spaces do not matter
    assert run_here("validate", "specs/mixtral-8x7b.yaml").returncode == 0
