"""The profile report's honest parts: the spread of the timed steps and the "noisy" verdict
(build_report on synthetic rank measurements, no process launched), the refusal of fewer
than 10 timed steps, and memory by category from MemTracker beside the simulator's terms
(one real rank of tiny-topk)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from moespec.profiling.report import MIN_TIMED_STEPS, build_report, step_spread, verdict
from moespec.sim.backend import load_backend
from moespec.sim.model import simulate
from moespec.spec import load_plan

ROOT = Path(__file__).resolve().parents[1]
TINY_TOPK = ROOT / "specs" / "tiny-topk.yaml"


def synthetic_rank(step_s: list[float], plan, predicted: dict) -> dict:
    """RankMeasurement.as_dict() of one rank whose counts are the prediction's and whose
    memory tracker saw exactly the predicted state (what build_report reads, nothing more)."""
    state = predicted["state_bytes_per_rank"]
    category = {"parameters": state["params"], "buffers": 0, "gradients": state["grads"], "optimizer": state["optimizer"] + 8,
                "activations": 1000, "temporaries": 10, "other": 0}  # fmt: skip
    category["total"] = sum(category.values())
    return {
        "rank": 0, "step_s": step_s, "flops_per_microstep": predicted["step_flops_per_rank_microstep"],
        "a2a_bytes_per_microstep": 0.0, "a2a_calls_per_microstep": 0.0, "shuffle_bytes_per_microstep": 0.0,
        "state_bytes": dict(state), "region_s": {"attention": 0.01}, "profiled_step_s": 0.02,
        "memory_kind": "peak_rss", "peak_memory_bytes": 2**28, "baseline_memory_bytes": 2**27,
        "memory_by_category": {"peak": category, "at_optimizer_step": category, "step_counter_bytes": 8},
        "tokens_per_expert": {}, "dropped_fraction": {},
    }  # fmt: skip


def report_for(step_s: list[float], *, calibration_error: float | None = 0.05, probe_s: float | None = None,
               calibration_probe_s: float | None = None, cpu_features: list | None = None,
               calibration_cpu_features: tuple | None = None) -> dict:  # fmt: skip
    plan = load_plan(TINY_TOPK)
    backend = dataclasses.replace(load_backend("cpu-local"), calibration_error=calibration_error, calibration_probe_s=calibration_probe_s,
                                  calibration_cpu_features=calibration_cpu_features)  # fmt: skip
    predicted = simulate(plan, backend)
    rank = synthetic_rank(step_s, plan, predicted) | {"probe_s": probe_s, "cpu_features": cpu_features or []}
    return build_report(plan, backend, [rank], spec=str(TINY_TOPK), device="cpu", steps=len(step_s), warmup=1, threads=1, trace_dir=None)


def time_rows(report: dict) -> list[dict]:
    return [row for row in report["comparison"] if row["figure"] in ("step time (s, median)", "tokens/s", "MFU")]


def test_the_spread_is_the_interquartile_range_over_the_median():
    # 1..10 ms: quartiles (inclusive) 3.25 and 7.75, median 5.5 -> 4.5 / 5.5.
    assert step_spread([i / 1e3 for i in range(1, 11)]) == pytest.approx(4.5 / 5.5)
    assert step_spread([0.02] * 10) == 0.0
    assert step_spread([0.02]) is None
    # One stray step does not move it (min/max would): quartiles stay among the tight ones.
    assert step_spread([0.020] * 9 + [0.200]) == 0.0
    assert verdict(0.30, band=0.10, spread=0.25) == "noisy"
    assert verdict(0.03, band=0.10, spread=0.02) == "ok" and verdict(-0.30, band=0.10, spread=0.02) == "out"
    assert verdict(0.30, band=None, spread=0.5) is None


def test_widely_spread_steps_get_the_noisy_verdict_not_ok_or_out():
    # Steps from 10 to 100 ms: IQR / median far above the band of max(2 x 5%, 5%) = 10%.
    report = report_for([0.010 * i for i in range(1, 11)])
    assert report["calibrated_error_band"] == pytest.approx(0.10)
    spread = report["measured"]["step_s"]["spread"]
    assert spread == pytest.approx(0.045 / 0.055) and report["measured"]["step_s"]["spread_measure"] == "interquartile range / median"
    assert report["noisy"] is True
    for row in time_rows(report):
        assert row["verdict"] == "noisy" and row["within_calibrated_error"] is None, row
    # Counts are not judged by the clock.
    assert all("verdict" not in row for row in report["comparison"] if row["exact"])


def test_tight_steps_get_ok_or_out_against_the_band():
    plan = load_plan(TINY_TOPK)
    predicted_s = simulate(plan, dataclasses.replace(load_backend("cpu-local"), calibration_error=0.05))["time"]["step_s"]
    # Within 1% of each other; the median 2% above the prediction (ok), then 3x it (out).
    for factor, expected in ((1.02, "ok"), (3.0, "out")):
        steps = [predicted_s * factor * (1 + 0.001 * (i - 5)) for i in range(10)]
        report = report_for(steps)
        assert report["measured"]["step_s"]["spread"] < 0.01 and report["noisy"] is False
        for row in time_rows(report):
            assert row["verdict"] == expected and row["within_calibrated_error"] is (expected == "ok"), row


def test_a_machine_off_its_calibrations_speed_is_flagged_beside_the_verdict():
    """The probe ran 25% slower than at calibration (band 10%): `drifted` is set and the speed
    reported, but the time rows keep their ok/out verdict (the probe has not tracked a step's
    speed well enough to overrule it: bench/accuracy.py's `at cal.`)."""
    plan = load_plan(TINY_TOPK)
    predicted_s = simulate(plan, dataclasses.replace(load_backend("cpu-local"), calibration_error=0.05))["time"]["step_s"]
    steps = [predicted_s * 1.02 * (1 + 0.001 * (i - 5)) for i in range(10)]
    slow = report_for(steps, probe_s=0.0050, calibration_probe_s=0.0040)
    assert slow["machine_speed"]["vs_calibration"] == pytest.approx(0.8) and slow["drifted"] is True and slow["noisy"] is False
    for row in time_rows(slow):
        assert row["verdict"] == "ok" and row["within_calibrated_error"] is True, row
    steady = report_for(steps, probe_s=0.0042, calibration_probe_s=0.0040)
    assert steady["drifted"] is False and all(row["verdict"] == "ok" for row in time_rows(steady))
    unknown = report_for(steps, probe_s=0.0042)  # a calibration without a probe: no drift to judge
    assert unknown["machine_speed"]["vs_calibration"] is None and unknown["drifted"] is False
    # noisy comes first: a spread wider than the band says nothing either way
    assert verdict(0.03, band=0.10, spread=0.25) == "noisy" and verdict(0.03, band=0.10, spread=0.02) == "ok"


def test_another_kind_of_cpu_than_the_calibrations_is_reported():
    """The shipped calibration before this field was made on a VM without bf16 units, whose
    bf16 Linears ran 30x slower than this one's: `same_cpu` says when the CPU's kernel level or
    bf16 / matrix flags differ, None when the calibration did not record them."""
    steps = [0.02] * 10
    here = ["AVX512", "avx512_bf16"]
    other = report_for(steps, cpu_features=here, calibration_cpu_features=("AVX512",))["machine_speed"]
    assert other["same_cpu"] is False and other["cpu_features"] == here and other["calibration_cpu_features"] == ["AVX512"]
    assert report_for(steps, cpu_features=here, calibration_cpu_features=("avx512_bf16", "AVX512"))["machine_speed"]["same_cpu"] is True
    assert report_for(steps, cpu_features=here)["machine_speed"]["same_cpu"] is None  # not recorded at calibration
    assert report_for(steps, calibration_cpu_features=("AVX512",))["machine_speed"]["same_cpu"] is None  # a GPU run records none


def test_the_shipped_calibrations_record_the_cpu_they_were_made_on():
    from moespec.profiling.calibrate import cpu_features
    from moespec.sim.calibration import backend_with_calibration

    for world in (1, 2):
        backend = backend_with_calibration(load_backend("cpu-local"), "auto", world=world)
        assert backend.calibration_cpu_features and backend.calibration_cpu_features[0] in ("DEFAULT", "VSX", "ZVECTOR", "AVX2", "AVX512", "SVE256")
    assert cpu_features()[0] == __import__("torch").backends.cpu.get_cpu_capability()


def test_without_a_calibration_there_is_no_verdict():
    report = report_for([0.010 * i for i in range(1, 11)], calibration_error=None)
    assert report["calibrated_error_band"] is None and report["noisy"] is False
    assert all("verdict" not in row and "within_calibrated_error" not in row for row in report["comparison"])


def test_memory_by_category_rows_take_the_step_counters_out_of_the_optimizer_state():
    report = report_for([0.02] * 10)
    rows = {row["figure"]: row for row in report["memory_by_category"]["rows"]}
    for figure in ("parameters", "gradients", "optimizer state"):
        assert rows[figure]["exact"] and rows[figure]["equal"], rows[figure]
    assert rows["activations (at peak)"]["measured"] == 1000 and rows["temporaries, buffers, other (at peak)"]["predicted"] is None


def test_fewer_than_ten_timed_steps_are_refused_in_one_line(tmp_path):
    assert MIN_TIMED_STEPS == 10
    done = subprocess.run([sys.executable, "-m", "moespec", "profile", str(TINY_TOPK), "--steps", "9", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert "--steps 9" in done.stderr and "at least 10" in done.stderr
    assert not (tmp_path / "out").exists()


def test_memtracker_sees_the_exact_state_and_activations_on_tiny_topk():
    """One real rank (world 1): the tracked step's parameters, gradients and optimizer state
    (step counters out) are the state `state_bytes` holds and the simulator predicts, to the
    byte; activations exist; the peak holds at least the state."""
    import torch

    from moespec.distributed.state import state_bytes
    from moespec.model.build import build_model
    from moespec.profiling.measure import TrainingBatches, memory_by_category
    from moespec.train import prepare_training, train_step

    torch.manual_seed(0)
    plan = load_plan(TINY_TOPK)
    setup = prepare_training(build_model(plan, seed=0, device=torch.device("cpu")), plan)
    batches = TrainingBatches(plan, torch.device("cpu"), seed=0, rank=0)
    train_step(setup, plan, batches.step())  # the optimizer state exists before the tracked step, as in profile
    tracked = memory_by_category(setup, plan, batches.step())
    held = state_bytes(setup.bare_model, setup.optimizers)
    predicted = simulate(plan, load_backend("cpu-local"))["memory_per_device"]
    at_step, peak = tracked["at_optimizer_step"], tracked["peak"]
    assert at_step["parameters"] == held["params"] == predicted["weights_bytes"] == 987_392
    assert at_step["gradients"] == held["grads"] == predicted["grads_bytes"]
    # AdamW keeps one 4-byte fp32 `step` tensor per parameter tensor; the rest is m and v.
    n_tensors = len(list(setup.bare_model.parameters()))
    assert tracked["step_counter_bytes"] == 4 * n_tensors
    assert at_step["optimizer"] - tracked["step_counter_bytes"] == held["optimizer"] == predicted["optimizer_bytes"]
    assert peak["activations"] > 0
    assert peak["total"] >= held["params"] + held["grads"] + held["optimizer"]
    assert peak["total"] == sum(v for k, v in peak.items() if k != "total")


def test_a_frozen_score_correction_holds_no_gradient_and_no_adam_state():
    """ERNIE's selection bias is a parameter nothing trains: after a real step the model holds
    it, but no gradient and no AdamW state for it, and the simulator says the same bytes."""
    import torch

    from moespec.distributed.state import state_bytes
    from moespec.model.build import build_model
    from moespec.profiling.measure import TrainingBatches
    from moespec.spec import plan_from_text
    from moespec.train import prepare_training, train_step

    text = TINY_TOPK.read_text().replace("type: topk", "type: topk, selection_bias: true")
    plan = plan_from_text(text, "tiny-topk-selection-bias.yaml")
    assert plan.moe_layers[0].moe.router.selection_bias
    torch.manual_seed(0)
    setup = prepare_training(build_model(plan, seed=0, device=torch.device("cpu")), plan)
    batches = TrainingBatches(plan, torch.device("cpu"), seed=0, rank=0)
    train_step(setup, plan, batches.step())
    held = state_bytes(setup.bare_model, setup.optimizers)
    predicted = simulate(plan, load_backend("cpu-local"))["memory_per_device"]
    frozen = 4 * sum(layer.moe.experts.count for layer in plan.moe_layers)
    assert held["params"] == predicted["weights_bytes"]
    assert held["grads"] == predicted["grads_bytes"] == held["params"] - frozen
    assert held["optimizer"] == predicted["optimizer_bytes"] == 2 * (held["params"] - frozen)


@pytest.mark.timeout(300)
def test_profile_with_a_frozen_parameter_under_zero3_on_two_ranks(tmp_path):
    """FSDP2 units holding ERNIE's frozen correction: MemTracker (which hooks every
    parameter's gradient) still tracks the step, and each rank's shards of parameters,
    gradients and AdamW state equal the simulator's, byte for byte."""
    import json

    text = TINY_TOPK.read_text().replace("type: topk", "type: topk, selection_bias: true")
    text = text.replace("  micro_batch: 8", "  micro_batch: 8\n  dp: 2\n  zero_stage: 3")
    spec = tmp_path / "ernie-z3.yaml"
    spec.write_text(text.replace("name: tiny-topk", "name: ernie-z3"))
    done = subprocess.run([sys.executable, "-m", "moespec", "profile", str(spec), "--nproc", "2", "--backend", "cpu-local",
                           "--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=280)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    rows = {row["figure"]: row for row in report["comparison"]}
    for name in ("parameters held per rank (bytes)", "gradients held per rank (bytes)", "optimizer state held per rank (bytes)"):
        assert rows[name]["measured"] == rows[name]["predicted"], rows[name]
    tracked = {row["figure"]: row for row in report["memory_by_category"]["rows"]}  # MemTracker's count of the same
    for name in ("parameters", "gradients", "optimizer state"):
        assert tracked[name]["equal"], tracked[name]


@pytest.mark.timeout(300)
def test_ddp_gradient_buckets_are_the_gradients_and_the_predicted_peak_holds_them(tmp_path):
    """DDP keeps a flat bucket of the dense gradients for the whole run. The gradients are views
    of it (no second copy), MemTracker counts it as gradients from the start of the step, and
    the simulator holds it from the first micro-step's backward: the peak agrees within 3%. With
    a separate copy the tracker met the buckets mid-backward and the simulator left them out:
    this spec measured 8.6% over the prediction."""
    import json

    text = TINY_TOPK.read_text().replace("  micro_batch: 8", "  micro_batch: 1\n  dp: 2\n  precision: bf16")
    spec = tmp_path / "tiny-dp2.yaml"
    spec.write_text(text.replace("name: tiny-topk", "name: tiny-dp2"))
    done = subprocess.run([sys.executable, "-m", "moespec", "profile", str(spec), "--nproc", "2", "--trace-steps", "0",
                           "--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=280)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["figure"]: row for row in json.loads(done.stdout)["memory_by_category"]["rows"]}
    for name in ("parameters", "gradients", "optimizer state"):
        assert rows[name]["equal"], rows[name]
    peak = rows["peak total"]
    assert abs(peak["relative_error"]) <= 0.03, peak
    # the buckets are gradients, not temporaries met in backward (they were 0.7 MB of 5.3 here)
    assert rows["temporaries, buffers, other (at peak)"]["measured"] < 0.05 * peak["measured"], rows


def _profile_memory(tmp_path, text: str, name: str, nproc: int = 1) -> dict:
    import json

    spec = tmp_path / f"{name}.yaml"
    spec.write_text(text)
    done = subprocess.run([sys.executable, "-m", "moespec", "profile", str(spec), "--nproc", str(nproc), "--trace-steps", "0", "--out", str(tmp_path / name), "--json"],
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    memory = json.loads(done.stdout)["memory_by_category"]
    return {"rows": {row["figure"]: row for row in memory["rows"]}, "peak": memory["ranks"][0]["peak"]}


def _base_in_the_middle(micro_batch: int) -> str:
    """8 blocks, one BASE layer of 16 experts (d_ff 512) in the middle: expert weights large
    next to the activations, three dense blocks above the MoE block."""
    text = (ROOT / "specs" / "tiny-base.yaml").read_text()
    return (text.replace("n_layers: 4", "n_layers: 8").replace("count: 4, d_ff: 128", "count: 16, d_ff: 512")
            .replace("micro_batch: 8", f"micro_batch: {micro_batch}").replace("name: tiny-base", f"name: base-middle-{micro_batch}"))  # fmt: skip


@pytest.mark.timeout(300)
def test_the_peak_inside_a_middle_dropless_layers_backward_leaves_out_the_blocks_above(tmp_path):
    """The peak comes in the BASE layer's backward, when the three dense blocks above it have
    freed what they kept: predicted within 2% (counting all activations, as before, the
    simulator said 41.7 MB against 37.8 measured: +10%)."""
    measured = _profile_memory(tmp_path, _base_in_the_middle(4), "middle")
    peak = measured["rows"]["peak total"]
    assert measured["peak"]["temporaries"] > 0.1 * peak["measured"]  # inside a backward, not at its start
    assert abs(peak["relative_error"]) <= 0.02, peak


@pytest.mark.timeout(300)
def test_the_peak_inside_adamws_step_holds_three_expert_weights(tmp_path):
    """With few activations the step peaks inside AdamW: CPU's single-tensor AdamW holds
    sqrt(v), its quotient and the previous parameter's denominator, three expert weights of
    2 MiB here. Predicted within 1% (without that term the simulator was 8.6% under)."""
    measured = _profile_memory(tmp_path, _base_in_the_middle(2), "optimizer")
    peak, state = measured["rows"]["peak total"], measured["rows"]["optimizer state"]
    assert measured["peak"]["activations"] < 0.001 * peak["measured"]  # after backward
    assert measured["peak"]["optimizer"] - state["measured"] == pytest.approx(3 * 16 * 64 * 512 * 4, rel=0.001)
    assert abs(peak["relative_error"]) <= 0.01, peak


@pytest.mark.timeout(300)
def test_profile_tracks_memory_under_zero1_on_two_ranks(tmp_path):
    """ZeRO-1's optimizer (ZeroAdamW) is not a torch Optimizer; MemTracker follows its torch
    AdamW over the chunk views instead (profile crashed with a TypeError before): every
    rank's parameters, gradients and AdamW chunks equal the simulator's."""
    text = TINY_TOPK.read_text().replace("  micro_batch: 8", "  micro_batch: 4\n  dp: 2\n  zero_stage: 1")
    measured = _profile_memory(tmp_path, text.replace("name: tiny-topk", "name: tiny-zero1"), "zero1", nproc=2)
    for name in ("parameters", "gradients", "optimizer state"):
        assert measured["rows"][name]["equal"], measured["rows"][name]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero_stage, flat_banks, peak_mib", [(0, 0, 226.08), (1, 4.5, 187.56)])
def test_the_expert_all_reduce_copies_nothing_and_zero1s_gather_holds_one_unit(tmp_path, zero_stage, flat_banks, peak_mib):
    """Two MoE layers, six expert tensors of 8 MiB, dp 2. After backward each expert gradient
    (at least GRAD_ALONE_BYTES) is all-reduced where it lies, where one flat copy of all 48 MiB
    was made before: at ZeRO 0 nothing is copied, and the peak is AdamW's step (three banks
    of temporaries). ZeRO-1 gathers its updated parameters one unit at a time (a block's
    dense parameters, the root, one layer's bank: its 12 MiB chunks and their 24 MiB gathered
    copy), where the whole expert group's chunks and their copy (72 MiB) were held at once:
    that is the peak at ZeRO 1, 187.6 MiB where it was 223.6. The simulator says both within 1%."""
    text = f"""version: 1
name: expert-buckets-zero{zero_stage}
model: {{vocab_size: 256, d_model: 256, n_layers: 2, n_heads: 4, d_ff: 512, seq_len: 64}}
moe:
  placement: {{type: layers, layers: [0, 1]}}
  experts: {{count: 8, d_ff: 1024}}
  router: {{type: topk, k: 2}}
parallelism: {{dp: 2, micro_batch: 1, zero_stage: {zero_stage}}}
"""
    measured = _profile_memory(tmp_path, text, "buckets", nproc=2)
    peak, bank = measured["rows"]["peak total"], 8 * 256 * 1024 * 4
    assert measured["peak"]["gradients"] == measured["rows"]["gradients"]["measured"] and measured["peak"]["temporaries"] == 0  # after backward
    assert measured["peak"]["activations"] == pytest.approx(flat_banks * bank, abs=4096)  # no flat copy, or one unit's gather
    assert peak["measured"] / 2**20 == pytest.approx(peak_mib, abs=0.01)
    assert abs(peak["relative_error"]) <= 0.01, peak


def test_gradient_buckets_pack_consecutive_tensors_up_to_the_cap():
    from moespec.distributed import data_parallel
    from moespec.distributed.data_parallel import grad_buckets
    from moespec.sim import memory

    # the simulator's buckets are the runtime's
    assert data_parallel.GRAD_BUCKET_BYTES == memory.GRAD_BUCKET_BYTES == 25 * 2**20
    assert data_parallel.GRAD_ALONE_BYTES == memory.GRAD_ALONE_BYTES == 2**20
    assert grad_buckets([10, 10, 30, 5, 5, 20], cap=25) == [[0, 1], [2], [3, 4], [5]]
    assert grad_buckets([8, 8, 8, 8, 8, 8], cap=25) == [[0, 1, 2], [3, 4, 5]]
    assert grad_buckets([5, 50, 5, 5, 40, 5], cap=25, alone=40) == [[0], [1], [2, 3], [4], [5]]  # a large one alone, in place
    assert grad_buckets([], cap=25) == []


@pytest.mark.timeout(300)
def test_three_dropless_layers_at_the_top_peak_below_the_top_one(tmp_path):
    """Three dropless layers of large experts over few tokens: by a lower layer's backward the
    upper layers' expert gradients outweigh what their blocks freed, so the peak is not in the
    top layer's backward (which alone the simulator looked at: 3.9% under). The lowest
    layer's point gives it within 2%."""
    text = """version: 1
name: three-at-the-top
model: {vocab_size: 256, d_model: 128, n_layers: 6, n_heads: 4, d_ff: 256, seq_len: 64}
moe:
  placement: {type: layers, layers: [3, 4, 5]}
  experts: {count: 16, d_ff: 256}
  router: {type: topk, k: 1}
  capacity: {dropless: true}
parallelism: {micro_batch: 8}
"""
    measured = _profile_memory(tmp_path, text, "three")
    peak, layer_grads = measured["rows"]["peak total"], 16 * 3 * 128 * 256 * 4
    assert measured["peak"]["gradients"] > 1.5 * layer_grads and measured["peak"]["temporaries"] > 0  # in a lower layer's backward
    assert abs(peak["relative_error"]) <= 0.02, peak
