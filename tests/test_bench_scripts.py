"""The benches import moespec's internals, so a refactor can break them without any other
test noticing: bench/moe_stages.py still called `experts._scale_rows` after it moved to
grouped_experts and failed on its first stage. These run the benches' own
report functions on a tiny shape, and the cheaper benches from the command line at a size that
takes a second or two."""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = {"name": "tiny", "d": 32, "f": 16, "E": 4, "k": 2, "tokens": 64}


@contextlib.contextmanager
def _two_threads():
    """The thread engine (and its product-level form) runs only with a second intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))  # the benches import each other (moe_stages imports moe_layer)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_moe_stages_reports_every_stage_of_every_engine():
    stages = _bench_module("moe_stages")
    with _two_threads():
        text = stages.report(TINY, repeats=3)
    lines = text.splitlines()
    assert lines[0].startswith("tiny: D 32, F 16, E 4, k 2, T 64")
    rows = {line.split()[0] + " " + line.split()[1]: line for line in lines[1:]}
    assert set(rows) == {"fwd threads", "fwd grouped_mm", "fwd capacity", "bwd threads", "bwd grouped_mm", "dense products"}
    for name in stages.FORWARD:
        assert f" {name} " in rows["fwd threads"]
    for name in stages.BACKWARD:
        assert f" {name} " in rows["bwd threads"]
    assert all("| sum " in line for line in rows.values())


def test_moe_threads_counts_exactly_the_kernels_product_flops():
    """bench/moe_threads.py's accounting: the products it times on the two threads are all
    of the dropless kernel's, 18 * A * D * F FLOPs a step for a gated expert."""
    threads_bench = _bench_module("moe_threads")
    shape = TINY
    with _two_threads():
        result = threads_bench.measure(shape, steps=1, warmup=1)
    rows_A = shape["tokens"] * shape["k"]
    counted = sum(t["product_gflops"] for t in result["threads"].values())
    assert round(counted * 1e9) == 18 * rows_A * shape["d"] * shape["f"]
    assert all(t["products_ms"] <= t["forward_ms"] + t["backward_ms"] for t in result["threads"].values())
    assert "outside the groups" in threads_bench.render(result)


def test_moe_ceiling_drops_exactly_the_gathers_and_scatters():
    """bench/moe_ceiling.py's column: the kernel's gathers read rows of a ready [A, D] buffer
    and its scatters write nothing, while its products keep every FLOP; outside the block the
    kernel moves rows again."""
    from torch.utils.flop_counter import FlopCounterMode

    from moespec.model import grouped_experts as GX

    ceiling = _bench_module("moe_ceiling")
    shape = TINY
    torch.manual_seed(0)
    fn, layer = ceiling.moe_layer.ours(shape, dropless=True)
    x = torch.randn(shape["tokens"], shape["d"], requires_grad=True)

    def flops() -> int:
        with FlopCounterMode(display=False) as counter:  # the all-groups path: the thread engine is off under a mode
            fn(x).sum().backward()
        return counter.get_total_flops()

    real_y, real_flops = fn(x).detach(), flops()
    calls = []
    gather, scatter = GX.gather, GX.scatter
    GX.gather = lambda *args: calls.append("gather") or gather(*args)
    GX.scatter = lambda *args: calls.append("scatter") or scatter(*args)
    try:
        buffers = {}
        with ceiling.without_data_movement(buffers), _two_threads():
            y = fn(x)
            y.backward(torch.ones_like(y))
            assert calls == []
            assert torch.count_nonzero(y) == 0  # (x's gradient still flows through the router)
            assert sorted(tuple(b.shape) for b in buffers.values()) == [(shape["tokens"] * shape["k"], shape["d"])] * 2  # x and dy
        with ceiling.without_data_movement(buffers):
            assert flops() == real_flops
        calls.clear()
        assert torch.equal(fn(x).detach(), real_y) and calls.count("gather") >= 1 and calls.count("scatter") == 1
    finally:
        GX.gather, GX.scatter = gather, scatter


@pytest.mark.parametrize(
    "args, expected",
    [
        (["moe_layer.py", "--shape", "32,16,4,2,64", "--no-peers", "--repeats", "1", "--warmup", "0"], "worst dropless / capacity"),
        (["moe_threads.py", "--shape", "32,16,4,2,64", "--steps", "1"], "outside the groups"),
        (["moe_ceiling.py", "--shape", "32,16,4,2,64", "--steps", "1"], "without moving rows"),
        (["moe_layer.py", "--ops", "32,16,4,2,64"], "ours_dropless (d32f16e4k2t64, 3 steps)"),
        (["group_products.py", "--experts", "8", "--rows", "32", "--width", "64", "--repeats", "4"], "1 thread: bmm"),
        (["base_solver.py", "--tokens", "256", "--experts", "8", "--dim", "32", "--repeats", "1"], "optimality gap"),
        (["sim_speed.py", "--designs", "1000", "--chunk", "500", "--repeats", "1"], "designs/s"),
        (["vs_llm_analysis.py"], "params, total"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)
def test_bench_runs_from_the_command_line(args, expected):
    """Each bench as a user starts it, at a size that takes a second or two."""
    done = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                          cwd=BENCH.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout


@pytest.mark.parametrize("script", ["moe_ceiling.py", "moe_threads.py"])
def test_shape_benches_refuse_an_unknown_shape_with_exit_2(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "g-e16k8", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown: ['nope']" in done.stderr.splitlines()[-1] and done.stdout == ""


def test_moe_layer_pairs_each_repeat_against_a_slow_stretch():
    """One slow repeat of one path moves a ratio of medians; the median of per-repeat ratios
    follows the other repeats. Here the capacity path's third step fell in a fast stretch
    (5 ms) and the dropless path's did not (11 ms): medians give 11 / 10, pairs give 1.00."""
    bench = _bench_module("moe_layer")
    shape = {"name": "s", "d": 8, "f": 8, "E": 2, "k": 1, "tokens": 2048,
             "median_ms": {"ours_dropless": 11.0, "ours_capacity": 10.0},
             "step_ms": {"ours_dropless": [10.0, 30.0, 11.0], "ours_capacity": [10.0, 30.0, 5.0]}}  # fmt: skip
    assert bench.worst([shape], "ours_dropless", "ours_capacity") == (1.1, "s")
    assert bench.worst_paired([shape], "ours_dropless", "ours_capacity") == (1.0, "s")
    saved_before = {k: v for k, v in shape.items() if k != "step_ms"}  # a --json run from before steps were kept
    assert bench.worst_paired([saved_before], "ours_dropless", "ours_capacity") is None
    result = bench.bench_shape(TINY, repeats=3, warmup=0, peers=False)
    assert {len(steps) for steps in result["step_ms"].values()} == {3}
    assert result["median_ms"]["dense"] == pytest.approx(sorted(result["step_ms"]["dense"])[1], abs=0.01)


def test_moe_layer_re_measures_each_target_at_its_worst_shape_on_the_same_layers():
    """--confirm: for each target ratio the run has, fresh pairs at the shape with its worst
    paired ratio (not the worst ratio of medians), on layers rebuilt with the same weights and
    input; a target with no shape (no BASE layers in the run) is not re-measured."""
    import argparse

    bench = _bench_module("moe_layer")
    other = dict(TINY, name="other", E=8)
    big = {"name": "big", "d": 8, "f": 8, "E": 2, "k": 1, "tokens": 1024}  # 512 rows per expert: the dense target's
    results = [dict(TINY, step_ms={"ours_dropless": [12.0, 14.0, 14.0], "ours_capacity": [10.0, 10.0, 13.0], "dense": [9.0] * 3}),  # medians 1.4, paired 1.2
               dict(other, step_ms={"ours_dropless": [13.0, 13.0, 13.0], "ours_capacity": [10.0, 10.0, 10.0], "dense": [9.0] * 3}),  # both 1.3
               dict(big, step_ms={"ours_dropless": [10.0] * 3, "ours_capacity": [10.0] * 3, "dense": [9.0, 8.0, 10.0]})]  # fmt: skip
    for r in results:
        r["median_ms"] = {name: statistics.median(steps) for name, steps in r["step_ms"].items()}
        r["ratio_to_dense"], r["notes"] = {name: ms / r["median_ms"]["dense"] for name, ms in r["median_ms"].items()}, []
    assert bench.worst(results, "ours_dropless", "ours_capacity")[1] == "tiny"
    args = argparse.Namespace(confirm=3, warmup=0, routers=False, no_peers=True, engines=False, gemm_ab=False)
    checked = bench.confirm(results, args)
    assert [(c["label"], c["name"]) for c in checked] == [("dropless / capacity", "other"), ("dropless / dense where rows per expert >= 512", "big")]
    assert [sorted(c["step_ms"]) for c in checked] == [["ours_capacity", "ours_dropless"], ["dense", "ours_dropless"]]
    assert {len(v) for c in checked for v in c["step_ms"].values()} == {3}
    assert bench.confirm(results, argparse.Namespace(**{**vars(args), "confirm": 0})) is None
    line = bench.confirm_line({"label": "BASE / Switch", "name": "other", "step_ms": {"ours_base": [11.0, 12.0, 15.0, 10.0], "ours_switch": [10.0] * 4}})
    assert line == "worst BASE / Switch re-measured at other: 1.15x paired over 4 fresh repeats (quartiles 1.10x-1.50x)"
    saved_before = {"name": "other", "step_ms": {"ours_dropless": [11.0, 12.0], "ours_capacity": [10.0] * 2}}  # a run from before labels
    assert bench.confirm_line(saved_before).startswith("worst dropless / capacity re-measured at other: 1.15x paired over 2")
    doc = {"torch": "t", "threads": 2, "step": "s", "repeats": 3, "load_avg_1min": [0, 0], "shapes": results, "busy_shapes": None}
    text = bench.render(dict(doc, confirm=checked)).splitlines()
    dense_at = next(i for i, t in enumerate(text) if t.startswith("worst dropless / dense"))
    assert text[dense_at + 1].startswith("worst dropless / dense where rows per expert >= 512 re-measured at big: ")
    assert any(t.startswith("worst dropless / capacity re-measured at other: 1.15x") for t in bench.render(dict(doc, confirm=saved_before)).splitlines())
    (first, _, x1, _), (again, _, x2, _) = bench.layers(other, peers=False), bench.layers(other, peers=False)
    assert torch.equal(x1, x2)
    for a, b in zip(first["ours_dropless"][1].parameters(), again["ours_dropless"][1].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def onednn_products(monkeypatch):
    """Every product of the thread engine on oneDNN (TINY's too: no MIN_FLOPS), the process's
    choice back after the test."""
    from moespec.model import cpu_gemm

    cpu_gemm.force("onednn")
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    yield
    cpu_gemm.force(None)


def _input(shape: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """x (requiring grad) and dy for one step at `shape`."""
    return torch.randn(shape["tokens"], shape["d"], requires_grad=True), torch.randn(shape["tokens"], shape["d"])


def test_moe_layer_chunks_ab_calls_onednn_256_rows_at_a_time_forward_and_backward(onednn_products, monkeypatch):
    """--chunks-ab's dropless_chunks256 column: every oneDNN call of its step, the backward's
    included (it runs after the layer's forward returned), is cut with the old sizes; today's
    column and the process keep CHUNKS."""
    from moespec.model import cpu_gemm, grouped_experts

    bench = _bench_module("moe_layer")
    monkeypatch.setitem(grouped_experts.GATE_UP, "max_f", 0)  # gate and up apart: 9 products a group
    seen = []
    real = cpu_gemm._chunks
    monkeypatch.setattr(cpu_gemm, "_chunks", lambda rows: seen.append(cpu_gemm.CHUNKS) or real(rows))
    with _two_threads():
        today = bench.ours(TINY, dropless=True)
        old = bench.on_chunks(today)
        x, dy = _input(TINY)
        bench.time_step(*old, x, dy)
        assert len(seen) == 9 * 4 and set(seen) == {(256,)}  # 9 products of 4 groups, forward and backward
        assert cpu_gemm.CHUNKS == (1024, 512, 256)
        seen.clear()
        bench.time_step(*today, x, dy)
        assert len(seen) == 36 and set(seen) == {(1024, 512, 256)}


def test_moe_layer_gate_up_ab_runs_gate_and_up_apart_forward_and_backward(onednn_products, monkeypatch):
    """--gate-up-ab's dropless_gate_up_apart column: no product of its step (forward or
    backward) takes the stacked [w_gate | w_up]; today's column, at d_ff 20 (d 48) on oneDNN,
    takes it in the forward, the input gradient and the weight gradient; GATE_UP is back after."""
    from moespec.model import cpu_gemm, grouped_experts

    bench = _bench_module("moe_layer")
    widths = []
    real = cpu_gemm._linear
    monkeypatch.setattr(cpu_gemm, "_linear", lambda x, w: widths.append((x.shape[1], *w.shape)) or real(x, w))
    shape = dict(TINY, d=48, f=20)  # the stacked width 2F = 40 is no other width, nor a (16-aligned) row count
    with _two_threads():
        today = bench.ours(shape, dropless=True)
        apart = bench.layers(shape, peers=False, ab=["gate_up_ab"])[0]["dropless_gate_up_apart"]
        x, dy = _input(shape)
        bench.time_step(*apart, x, dy)
        stacked = 2 * shape["f"]
        assert widths and not any(stacked in pair for pair in widths)
        assert grouped_experts.GATE_UP["max_f"] == 96
        widths.clear()
        bench.time_step(*today, x, dy)
        assert {(shape["d"], stacked, shape["d"]), (stacked, shape["d"], stacked)} <= set(widths)  # forward [D -> 2F]; input gradient [2F -> D]
        assert any(w_rows == stacked and x_cols == w_cols for x_cols, w_rows, w_cols in widths if x_cols != shape["d"])  # x^T @ grad [.., 2F]


def test_moe_layer_gemm_ab_runs_the_same_layer_on_mkl(monkeypatch):
    """--gemm-ab's dropless_mkl column: the chosen library's products are not called in its
    steps, and the process's choice is back afterwards."""
    from moespec.model import cpu_gemm

    bench = _bench_module("moe_layer")
    cpu_gemm.force("onednn")  # its check runs a product: before the count starts
    calls = []
    real = cpu_gemm.times_into
    monkeypatch.setattr(cpu_gemm, "times_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        with _two_threads():
            chosen = bench.ours(TINY, dropless=True)
            on_mkl = bench.on_mkl(chosen)
            x, dy = _input(TINY)
            bench.time_step(*on_mkl, x, dy)
            assert calls == [] and cpu_gemm.backend() == "onednn"
            bench.time_step(*chosen, x, dy)
            assert calls
    finally:
        cpu_gemm.force(None)
