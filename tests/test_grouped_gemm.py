"""The dropless kernel's matmul engines (model/group_matmuls.py): torch._grouped_mm and the
per-expert loop give the same outputs and gradients, FlopCounterMode counts the grouped one
exactly, and the grouped path runs where it should."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moespec.model import group_matmuls
from moespec.model.experts import ExpertBank
from moespec.model.group_matmuls import grouped_gemm_available


def _problem(activation: str, d: int, f: int, counts: list[int], dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    bank = ExpertBank(n_experts=len(counts), d_model=d, d_ff=f, activation=activation)
    tokens = 24
    token_A = torch.cat([torch.randperm(tokens)[:n] for n in counts])  # sorted by expert, counts[e] each
    gate_A = torch.rand(token_A.numel(), requires_grad=True)
    x_TD = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    return bank, x_TD, token_A, gate_A


def routed_bank(counts: list[int], tokens: int, biased: bool, seed: int):
    """Experts (d 16, d_ff 24; clamped SwiGLU with random biases, or SwiGLU) and rows routed to
    them: token_A sorted by expert (counts[e] each), gates and x, all requiring grad."""
    torch.manual_seed(seed)
    bank = ExpertBank(n_experts=len(counts), d_model=16, d_ff=24, activation="swiglu_clamped" if biased else "swiglu", init_std=0.5, bias=biased)
    if biased:
        with torch.no_grad():
            for b in (bank.b_gate, bank.b_up, bank.b_down):
                b.normal_()
    token_A = torch.cat([torch.randperm(tokens)[:n] for n in counts])
    gate_A = torch.rand(token_A.numel(), requires_grad=True)
    return bank, torch.randn(tokens, 16, requires_grad=True), token_A, gate_A


def _run(bank, x_TD, token_A, gate_A, counts, *, grouped: bool, dtype=torch.float32):
    group_matmuls.GROUPED_GEMM["enabled"] = grouped
    try:
        for p in bank.parameters():
            p.grad = None
        x_TD.grad = gate_A.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y_TD = bank.forward_dropless(x_TD, token_A, gate_A, counts)
        (y_TD.float() * torch.linspace(-1, 1, y_TD.numel()).view_as(y_TD)).sum().backward()
        return [y_TD.detach().float(), x_TD.grad.float(), gate_A.grad.float()] + [p.grad.float() for p in bank.parameters()]
    finally:
        group_matmuls.GROUPED_GEMM["enabled"] = True


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], ids=["grouped_mm", "group-threads"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[5, 0, 9, 3, 7], [0, 0, 12, 0, 1], [6, 6, 6, 6, 6]], ids=["empty-one", "mostly-empty", "even"])
def test_grouped_gemm_equals_the_loop_float32(activation, counts, threads):
    """One intra-op thread: torch._grouped_mm; two: each group's mm on one of two threads
    (`group_threads`); equal groups: one bmm. Each against the plain loop."""
    bank, x_TD, token_A, gate_A = _problem(activation, 16, 24, counts)
    assert grouped_gemm_available(bank.w_up)
    expected = "batched" if len(set(counts)) == 1 else ("threads" if threads == 2 else "grouped")
    with _threads(threads):
        assert group_matmuls.engine(counts, bank.w_up) == expected
        fast = _run(bank, x_TD, token_A, gate_A, counts, grouped=True)
    loop = _run(bank, x_TD, token_A, gate_A, counts, grouped=False)
    for a, b in zip(fast, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_group_threads_step_aside_for_dispatch_modes_and_one_thread():
    """FlopCounterMode (like MemTracker and op traces) sees only its own thread: under it the
    kernel keeps every matmul on the calling thread, and counts them all."""
    counts = [5, 0, 9, 3, 7]
    bank, x_TD, token_A, gate_A = _problem("swiglu", 16, 24, counts)
    with _threads(2):
        assert group_matmuls.engine(counts, bank.w_up) == "threads"
        with FlopCounterMode(display=False) as counter:
            assert group_matmuls.engine(counts, bank.w_up) == "grouped"
            bank.forward_dropless(x_TD, token_A, gate_A, counts).sum().backward()
        assert counter.get_total_flops() == 18 * sum(counts) * 16 * 24
        assert torch.get_num_threads() == 2  # the kernel gives the threads back
    with _threads(1):
        assert group_matmuls.engine(counts, bank.w_up) == "grouped"


def test_group_threads_run_every_group_once_and_pass_errors_on():
    from moespec.model import group_threads

    counts = [3, 0, 8, 1, 0, 5]
    seen = []
    with _threads(2):
        group_threads.run(counts, lambda e, rows: seen.append((e, rows.start, rows.stop)))
        assert sorted(seen) == [(0, 0, 3), (2, 3, 11), (3, 11, 12), (5, 12, 17)]

        def fail(e, rows):
            if e == 3:
                raise RuntimeError("group 3 failed")

        with pytest.raises(RuntimeError, match="group 3 failed"):
            group_threads.run(counts, fail)
        assert torch.get_num_threads() == 2
    seen.clear()
    with _threads(1):  # after a pool of workers was made: the groups on this thread alone
        group_threads.run(counts, lambda e, rows: seen.append((e, rows.start, rows.stop)))
    assert sorted(seen) == [(0, 0, 3), (2, 3, 11), (3, 11, 12), (5, 12, 17)]


def test_grouped_gemm_equals_the_loop_bf16():
    counts = [4, 0, 11, 9]
    bank, x_TD, token_A, gate_A = _problem("swiglu", 32, 48, counts)
    grouped = _run(bank, x_TD, token_A, gate_A, counts, grouped=True, dtype=torch.bfloat16)
    loop = _run(bank, x_TD, token_A, gate_A, counts, grouped=False, dtype=torch.bfloat16)
    for a, b in zip(grouped, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_flop_counter_counts_the_grouped_gemm_exactly():
    counts = [5, 0, 9, 3, 7]
    bank, x_TD, token_A, gate_A = _problem("swiglu", 16, 24, counts)
    rows, d, f = sum(counts), 16, 24
    for grouped in (True, False):
        group_matmuls.GROUPED_GEMM["enabled"] = grouped
        try:
            with FlopCounterMode(display=False) as counter:
                bank.forward_dropless(x_TD, token_A, gate_A, counts).sum().backward()
        finally:
            group_matmuls.GROUPED_GEMM["enabled"] = True
        assert counter.get_total_flops() == 18 * rows * d * f, grouped  # 3 projections x (forward + 2 backward) x 2 * N * D * F


def test_where_the_grouped_gemm_runs():
    assert grouped_gemm_available(torch.empty(2, 16, 24))  # CPU float32, 64- and 96-byte rows
    assert not grouped_gemm_available(torch.empty(2, 16, 18))  # 72-byte rows: the kernel's stride rule
    assert not grouped_gemm_available(torch.empty(2, 16, 24, dtype=torch.float64))  # gradcheck runs the loop
    assert not grouped_gemm_available(torch.empty(2, 16, 24, device="meta"))  # meta demands bf16: the loop shapes it


@pytest.mark.parametrize("activation", ["swiglu_clamped", "swiglu", "gelu"])
def test_expert_biases_and_clamped_swiglu_match_autograd_of_the_textbook_formula(activation):
    """gpt-oss's experts: per-expert biases (the down one scaled by the gate, like the rest of
    the expert's output) and the clamped SwiGLU, in the hand-written backward, against autograd
    of `reference_forward` (one expert at a time) in float64; weights wide enough that many
    pre-activations pass the clamp at 7, so both sides of every clamp are exercised."""
    torch.manual_seed(0)
    counts = [5, 0, 9, 3, 7]
    bank = ExpertBank(n_experts=len(counts), d_model=16, d_ff=24, activation=activation, init_std=1.0, bias=True).double()
    with torch.no_grad():
        for b in (bank.b_gate, bank.b_up, bank.b_down):
            if b is not None:
                b.normal_()
    token_A = torch.cat([torch.randperm(24)[:n] for n in counts])
    expert_A = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    gate_A = torch.rand(token_A.numel(), dtype=torch.float64, requires_grad=True)
    x_TD = torch.randn(24, 16, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, 24 * 16, dtype=torch.float64).view(24, 16)

    def grads(forward):
        for p in [*bank.parameters(), x_TD, gate_A]:
            p.grad = None
        y = forward()
        (y * weights).sum().backward()
        return [y.detach(), x_TD.grad, gate_A.grad] + [p.grad for p in bank.parameters()]

    kernel = grads(lambda: bank.forward_dropless(x_TD, token_A, gate_A, counts))
    textbook = grads(lambda: bank.reference_forward(x_TD, token_A, expert_A, gate_A))
    assert len(kernel) == len(textbook) == 3 + (6 if bank.gated else 4)
    for a, b in zip(kernel, textbook, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_grouped_gemm_equals_the_loop_with_biases_and_clamp():
    counts = [5, 0, 9, 3, 7]
    torch.manual_seed(0)
    bank = ExpertBank(n_experts=len(counts), d_model=16, d_ff=24, activation="swiglu_clamped", init_std=1.0, bias=True)
    with torch.no_grad():
        for b in (bank.b_gate, bank.b_up, bank.b_down):
            b.normal_()
    _, x_TD, token_A, gate_A = _problem("swiglu", 16, 24, counts)
    grouped = _run(bank, x_TD, token_A, gate_A, counts, grouped=True)
    loop = _run(bank, x_TD, token_A, gate_A, counts, grouped=False)
    for a, b in zip(grouped, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_equal_groups_run_one_batched_matmul_equal_to_the_loop_and_counted_exactly(activation):
    """BASE gives every expert the same rows: the kernel runs one bmm per projection on the
    [E, N, D] view. It must give the loop's outputs and gradients and the same FLOP count."""
    counts = [4, 4, 4, 4, 4, 4]
    bank, x_TD, token_A, gate_A = _problem(activation, 16, 32, counts)
    assert group_matmuls.engine(counts, bank.w_up) == "batched"
    assert group_matmuls.engine([4, 4, 0, 4, 4, 4], bank.w_up) != "batched"  # an empty group is not a batch
    calls = []
    original_bmm = torch.bmm
    try:
        torch.bmm = lambda *a, **k: calls.append(1) or original_bmm(*a, **k)
        batched = _run(bank, x_TD, token_A, gate_A, counts, grouped=True)
    finally:
        torch.bmm = original_bmm
    projections = 3 if activation == "swiglu" else 2
    assert len(calls) == 3 * projections  # forward, input gradient, weight gradient per projection
    loop = _run(bank, x_TD, token_A, gate_A, counts, grouped=False)
    for a, b in zip(batched, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with FlopCounterMode(display=False) as counter:
        bank.forward_dropless(x_TD, token_A, gate_A, counts).sum().backward()
    assert counter.get_total_flops() == 6 * projections * sum(counts) * 16 * 32


def test_equal_groups_leave_the_bmm_where_onednn_products_are_faster(monkeypatch):
    """Where the thread engine's fp32 products run on oneDNN, equal groups whose products reach
    cpu_gemm.MIN_FLOPS go to the thread engine (bmm is MKL's); smaller ones, MKL processes,
    bf16, one thread and dispatch modes keep the bmm. The numbers are the loop's either way."""
    from moespec.model import cpu_gemm

    counts = [4, 4, 4, 4, 4, 4]  # products of 2 * 4 * 16 * 32 = 4096 FLOPs
    bank, x_TD, token_A, gate_A = _problem("swiglu", 16, 32, counts)
    try:
        with _threads(2):
            cpu_gemm.force("onednn")
            assert group_matmuls.engine(counts, bank.w_up) == "batched"  # under 12 MFLOP
            monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 4096)
            assert group_matmuls.engine(counts, bank.w_up) == "threads"
            assert group_matmuls.engine([3, 3, 3, 3, 3, 3], bank.w_up) == "batched"  # 3072 FLOPs
            assert group_matmuls.engine(counts, bank.w_up.to(torch.bfloat16)) == "batched"
            with FlopCounterMode(display=False):
                assert group_matmuls.engine(counts, bank.w_up) == "batched"
            threaded = _run(bank, x_TD, token_A, gate_A, counts, grouped=True)
            cpu_gemm.force("mkl")
            assert group_matmuls.engine(counts, bank.w_up) == "batched"
        with _threads(1):
            cpu_gemm.force("onednn")
            assert group_matmuls.engine(counts, bank.w_up) == "batched"
    finally:
        cpu_gemm.force(None)
    loop = _run(bank, x_TD, token_A, gate_A, counts, grouped=False)
    for a, b in zip(threaded, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_group_threads_under_inference_mode():
    counts = [5, 0, 9, 3, 7]
    bank, x_TD, token_A, gate_A = _problem("swiglu", 16, 24, counts)
    with _threads(2), torch.inference_mode():
        assert group_matmuls.engine(counts, bank.w_up) == "threads"
        y_TD = bank.forward_dropless(x_TD, token_A, gate_A, counts)
    with _threads(1), torch.no_grad():
        torch.testing.assert_close(y_TD, bank.forward_dropless(x_TD, token_A, gate_A, counts), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["biases-clamped", "no-gate", "frozen-input", "bf16", "ungated-one-group"])
def test_one_group_per_thread_equals_all_groups_at_once(case):
    """The thread engine runs each group's whole pipeline (gather, projections, activation,
    gate, down projection, and the backward's) on one thread, writing its rows of shared
    outputs and its expert's slice of the weight gradients: every input the kernel takes must
    give what the all-groups loop gives, outputs and every gradient, with empty groups
    keeping zero weight gradients."""
    counts = [0, 0, 12, 0, 1] if case == "ungated-one-group" else [5, 0, 9, 1, 7]  # a one-row group too
    activation = {"biases-clamped": "swiglu_clamped", "ungated-one-group": "relu"}.get(case, "swiglu")
    torch.manual_seed(3)
    bank = ExpertBank(n_experts=len(counts), d_model=16, d_ff=24, activation=activation, init_std=0.5, bias=case == "biases-clamped")
    if bank.bias:
        with torch.no_grad():
            for b in (bank.b_gate, bank.b_up, bank.b_down):
                b.normal_()
    _, x_TD, token_A, gate_A = _problem("swiglu", 16, 24, counts, seed=4)
    x_TD.requires_grad_(case != "frozen-input")
    gate_A.requires_grad_(case != "frozen-input")
    dtype = torch.bfloat16 if case == "bf16" else torch.float32

    def run(grouped: bool):
        group_matmuls.GROUPED_GEMM["enabled"] = grouped
        try:
            for t in [*bank.parameters(), x_TD, gate_A]:
                t.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                if case == "no-gate":
                    y = bank.forward_dropless(x_TD, token_A, None, counts)
                else:
                    y = bank.forward_dropless(x_TD, token_A, gate_A, counts)
            (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            grads = [x_TD.grad, gate_A.grad] + [p.grad for p in bank.parameters()]
            return [y.detach().float()] + [None if g is None else g.float() for g in grads]
        finally:
            group_matmuls.GROUPED_GEMM["enabled"] = True

    with _threads(2):
        assert group_matmuls.engine(counts, bank.w_up) == "threads"
        threaded = run(True)
    loop = run(False)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(threaded, loop, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    expected_none = {"frozen-input": 2, "no-gate": 1}.get(case, 0)
    assert sum(g is None for g in threaded) == expected_none
    empty = [e for e, n in enumerate(counts) if n == 0]
    for p in (bank.w_up, bank.w_down):
        assert p.grad[empty].abs().max() == 0  # experts without rows: zero gradient, not garbage


def test_groups_are_cut_into_pieces_only_when_whole_groups_leave_a_thread_idle():
    from moespec.model.group_threads import pieces

    def covered(ps, counts):
        rows = sorted((p.rows.start, p.rows.stop) for p in ps)
        assert rows[0][0] == 0 and rows[-1][1] == sum(counts)
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))  # every row exactly once
        starts = [sum(counts[:e]) for e in range(len(counts) + 1)]
        for p in ps:
            if p.groups == 1:
                assert starts[p.expert] <= p.rows.start < p.rows.stop <= starts[p.expert + 1]
            else:  # a bundle: exactly its groups' rows, whole
                assert (p.rows.start, p.rows.stop) == (starts[p.expert], starts[p.expert + p.groups]) and p.extra == -1

    even16 = [4096] * 16  # 8 groups per thread: balanced whole
    assert [p.extra for p in pieces(even16, 2, max_extra=100)] == [-1] * 16
    seven = [1171] * 7  # one thread would run 4 groups, the other 3
    ps = pieces(seven, 2, max_extra=100)
    covered(ps, seven)
    assert len(ps) == 14 and sorted(p.extra for p in ps) == [-1] * 7 + list(range(7))
    assert pieces(seven, 2, max_extra=100) == ps  # the same counts, the same pieces
    assert len(pieces(seven, 2, max_extra=3)) <= 10  # the scratch budget caps the extra pieces
    assert [p.extra for p in pieces(seven, 2, max_extra=0)] == [-1] * 7
    assert [p.extra for p in pieces(seven, 1, max_extra=100)] == [-1] * 7  # one thread: nothing to balance
    skewed = [0, 3000, 10, 0, 200]
    ps = pieces(skewed, 2, max_extra=100)
    covered(ps, skewed)
    assert all(p.rows.stop - p.rows.start >= 256 for p in ps if p.expert == 1) and len(ps) > 3
    assert all(p.groups == 1 for p in ps)  # bundles only where asked


def test_small_whole_groups_run_in_bundles():
    """At 64 rows a group, dispatching each group's ~40 ops costs more than their arithmetic:
    the kernel's pieces join consecutive whole groups into bundles of at most 512 rows (fewer
    where the rows' activations would not stay in cache), never a split group, and not more
    than an eighth of a thread's share each."""
    from moespec.model.group_threads import bundle_rows, pieces

    assert bundle_rows((256 + 2 * 256) * 4) == 512  # issue-2: D 256, F 256, gated
    assert bundle_rows((1024 + 2 * 128) * 4) == 307  # g-e64k8: 256-row groups stay whole
    sixty_four = [64] * 128  # issue-2: 8192 rows
    ps = pieces(sixty_four, 2, max_extra=100, bundle_rows=512)
    assert [(p.groups, p.rows.stop - p.rows.start) for p in ps] == [(8, 512)] * 16
    assert [p.groups for p in pieces(sixty_four, 2, max_extra=100)] == [1] * 128  # not asked
    assert [p.groups for p in pieces(sixty_four, 1, bundle_rows=512)] == [1] * 128  # one thread: the all-groups slab's business
    assert [p.groups for p in pieces([256] * 64, 2, bundle_rows=307)] == [1] * 64
    few = [64] * 16  # 1024 rows: bundles of at most 1024 / 16 = 64 rows, so none
    assert [p.groups for p in pieces(few, 2, bundle_rows=512)] == [1] * 16
    mixed = [600, 0, 100, 0, 0, 50, 6000, 90, 90]  # empty groups inside a bundle; the split 6000-row group is not joined
    ps = pieces(mixed, 2, max_extra=100, bundle_rows=512)
    spans = [(p.expert, p.groups) for p in ps]
    assert (2, 4) in spans and (7, 2) in spans and all(p.groups == 1 for p in ps if p.expert in (0, 6))
    assert sum(p.expert == 6 for p in ps) > 1


BUNDLED = [2, 0, 1, 2, 60, 1, 0, 3, 1, 2, 9]  # 81 rows: bundles of <= 5 rows (0-3, 5-8), the 60-row group split


@pytest.mark.parametrize("products", ["grouped", "per-group"])
@pytest.mark.parametrize("case", ["gated", "biases-clamped"])
def test_bundled_groups_give_the_loops_gradients(case, products, monkeypatch):
    """Bundles (a run of small groups: elementwise ops once, each product one grouped GEMM or
    one mm per group, empty groups inside) beside a split group: outputs and every gradient
    equal the loop's."""
    from moespec.model import group_grads, group_threads, grouped_experts

    monkeypatch.setitem(group_threads.MIN_PIECE_ROWS, "rows", 4)
    monkeypatch.setitem(grouped_experts.GATE_UP, "max_f", 0)  # gate and up apart on oneDNN CPUs too (stacked: test_cpu_gemm)
    monkeypatch.setattr(group_grads, "scratch_slots", lambda saved: 100)
    if products == "per-group":  # as where a bundled group's products reach cpu_gemm.MIN_FLOPS
        monkeypatch.setattr(grouped_experts, "_grouped_rows", lambda w_EKN: 0.0)
    ps = group_threads.pieces(BUNDLED, 2, max_extra=100, bundle_rows=512)
    assert {(p.expert, p.groups) for p in ps if p.groups > 1} == {(0, 4), (5, 4)} and any(p.extra >= 0 for p in ps)
    bank, x_TD, token_A, gate_A = routed_bank(BUNDLED, 64, case != "gated", seed=8)
    assert grouped_gemm_available(bank.w_up)  # its probe's calls made before they are counted
    calls, grouped_mm = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    with _threads(2):
        assert group_matmuls.engine(BUNDLED, bank.w_up) == "threads"
        bundled = _run(bank, x_TD, token_A, gate_A, BUNDLED, grouped=True)
    # two bundles, 3 products forward and 6 backward each; none where the bundles loop
    assert len(calls) == (2 * 9 if products == "grouped" else 0)
    loop = _run(bank, x_TD, token_A, gate_A, BUNDLED, grouped=False)
    for a, b in zip(bundled, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for p in (bank.w_up, bank.w_down):
        assert p.grad[[1, 6]].abs().max() == 0  # the empty groups inside bundles


def test_bundles_run_one_grouped_gemm_per_product_while_their_products_are_small():
    """A bundle's products are one torch._grouped_mm each while every group's product is under
    cpu_gemm.MIN_FLOPS (where it would run mm, and dispatch matters), else one product per
    group; a lone group never is; nor anything where _grouped_mm cannot run (widths not
    16-byte multiples)."""
    from moespec.model import cpu_gemm
    from moespec.model.group_threads import Piece
    from moespec.model.grouped_experts import _grouped_rows, _slab

    limit = _grouped_rows(torch.zeros(8, 256, 256))
    assert limit == cpu_gemm.MIN_FLOPS / (2 * 256 * 256)  # 91.6 rows: a 92-row group's product reaches it
    assert _grouped_rows(torch.zeros(8, 6, 256)) == 0.0  # 24-byte rows
    counts = [40, 91, 0, 92, 300]
    bundle = _slab(Piece(0, slice(0, 131), -1, groups=3), counts, None, False, limit)
    assert bundle.offs.tolist() == [40, 131, 131]
    assert _slab(Piece(1, slice(40, 223), -1, groups=3), counts, None, False, limit).offs is None  # 92 rows
    assert _slab(Piece(4, slice(223, 523), -1), counts, None, False, float("inf")).offs is None  # one group: one mm


@pytest.mark.parametrize("case", ["gated", "biases-clamped"])
@pytest.mark.parametrize("products", ["chosen", "onednn-gate-up"])
def test_split_groups_give_the_loops_gradients(case, products, monkeypatch):
    """A group cut into pieces: each piece's weight gradient is a partial sum, added to its
    expert's after the run. Outputs and every gradient must equal the loop's, and repeat
    exactly from run to run whichever thread took which piece. Also on oneDNN with gate and up
    as one product, whose partial gradients are [D, 2F] slots."""
    from moespec.model import cpu_gemm, group_grads, group_threads, grouped_experts

    if products == "onednn-gate-up":
        if not cpu_gemm._runs():
            pytest.skip("this torch has no oneDNN inner product")
        cpu_gemm.force("onednn")
        monkeypatch.setitem(grouped_experts.GATE_UP, "max_f", 24)  # the bank's d_ff
        monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)  # its tiny products on oneDNN too
    else:
        monkeypatch.setitem(grouped_experts.GATE_UP, "max_f", 0)

    monkeypatch.setitem(group_threads.MIN_PIECE_ROWS, "rows", 4)
    monkeypatch.setattr(group_grads, "scratch_slots", lambda saved: 100)  # the real budget is an [A, D] tensor: tiny here
    cut = []
    monkeypatch.setattr(group_grads, "add_partials", lambda grads, pieces, add=group_grads.add_partials: cut.append(sorted(grads)) or add(grads, pieces))
    counts = [9, 0, 40, 3, 5]  # whole groups: one thread 40 rows, the other 17
    assert any(p.extra >= 0 for p in group_threads.pieces(counts, 2, max_extra=100))
    bank, x_TD, token_A, gate_A = routed_bank(counts, 48, case != "gated", seed=5)
    try:
        with _threads(2):
            assert group_matmuls.engine(counts, bank.w_up) == "threads"
            first = _run(bank, x_TD, token_A, gate_A, counts, grouped=True)
            again = _run(bank, x_TD, token_A, gate_A, counts, grouped=True)
    finally:
        cpu_gemm.force(None)
    loop = _run(bank, x_TD, token_A, gate_A, counts, grouped=False)
    slots = "w_gu+" if products == "onednn-gate-up" else "w_up+"
    assert len(cut) == 2 and all(slots in names for names in cut)  # the backward ran split groups, their partials in these slots
    for a, b, c in zip(first, again, loop, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_the_backwards_scratch_stays_within_one_gathered_copy_of_x():
    """Split-off pieces of the backward hold partial gradients of one expert's weights each;
    all of them together may take no more memory than the [A, D] gathered copy of x that
    the all-groups path makes (f-e7k2 of bench/moe_layer.py: 5 slots of 1.5 MiB in 8.0 MiB)."""
    from moespec.model.group_grads import scratch_slots
    from moespec.model.grouped_experts import _Saved

    E, D, F, A = 7, 256, 512, 8200
    meta = dict(device="meta")
    weights = (torch.empty(E, D, F, **meta), torch.empty(E, D, F, **meta), torch.empty(E, F, D, **meta))
    saved = _Saved(torch.empty(4100, D, **meta), torch.empty(A, dtype=torch.long, **meta), None, weights, (None,) * 3, None, None, "swiglu")
    assert scratch_slots(saved) == (A * D * 4) // (3 * D * F * 4) == 5
