"""`moespec profile` and `moespec calibrate` on real runs: counts equal the simulator's, traces
parse with the named regions, a killed rank ends the run with its name, and calibrations
validate against their schema and change the prediction."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_here import run_here

from moespec.sim.backend import load_backend
from moespec.sim.calibration import apply_calibration, calibration_errors, load_calibration, shipped_calibration
from moespec.sim.model import simulate
from moespec.spec import SpecErrors, load_plan

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
MOESPEC = [sys.executable, "-m", "moespec"]
QUICK = ["--steps", "10", "--warmup", "1", "--trace-steps", "1"]


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args, **kwargs):
    return subprocess.run([*MOESPEC, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs)


def trace_region_names(trace_dir: Path) -> dict[str, set[str]]:
    """worker name -> names of the moespec regions in its Chrome trace."""
    found = {}
    for path in trace_dir.glob("*.pt.trace.json"):
        events = json.loads(path.read_text())["traceEvents"]  # a trace that does not parse fails here
        found[path.name.split(".")[0]] = {e["name"] for e in events if e.get("name", "").startswith("moespec::")}
    return found


def test_profile_world_1_counts_equal_the_simulator_and_traces_parse(tmp_path):
    done = run(["profile", "specs/tiny-topk.yaml", "--json", "--out", str(tmp_path), *QUICK])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    predicted = simulate(load_plan(SPECS / "tiny-topk.yaml"), load_backend("cpu-local"))
    # Matmul FLOPs of one micro-step of tiny-topk (8 x 64 = 512 tokens), by hand, forward:
    #   q, k, v, o        2 * 512 * 4*64*64            = 16,777,216  x 4 layers
    #   scores, values    2 * 2 * 8 seqs*4 heads*64*64*16 =  8,388,608  x 4 layers
    #   dense ffn         2 * 512 * 3*64*128           = 25,165,824  x 2 layers
    #   router            2 * 512 * 64*4               =    262,144  x 2 layers
    #   experts           2 * E*C * 3*64*64, C = 1.25 * 512*2/4 = 320 slots: 2 * 1280 * 12288
    #                                                  = 31,457,280  x 2 layers
    #   lm head           2 * 512 * 256*64             = 16,777,216
    # = 231,211,008 forward; backward is twice that.
    forward = 4 * 16_777_216 + 4 * 8_388_608 + 2 * 25_165_824 + 2 * 262_144 + 2 * 31_457_280 + 16_777_216
    assert report["measured"]["flops_per_rank_microstep"] == [3 * forward] == [693_633_024]
    assert predicted["step_flops_per_rank_microstep"] == 3 * forward  # and the simulator agrees
    assert report["measured"]["a2a_bytes_per_rank_microstep"] == [0] and report["measured"]["a2a_calls_per_rank_microstep"] == [0]
    assert report["exact_counts"] is True
    # Times: positive, finite, the median inside its spread, the rates derived from it.
    step = report["measured"]["step_s"]
    assert all(0 < t < 60 for t in step["per_step"]) and len(step["per_step"]) == 10
    assert step["min"] == min(step["per_step"]) <= step["median"] <= step["max"] == max(step["per_step"])
    assert report["measured"]["tokens_per_s"] == pytest.approx(8 * 64 / step["median"])  # global_batch x seq_len per step
    assert 0 < report["measured"]["mfu"] < 1
    # The shipped 1-rank calibration applies (auto) and judges every time row by its band.
    assert report["calibration"].endswith("cpu-local.nproc1.json") and report["calibrated_error_band"] >= 0.05
    rows = {row["figure"]: row for row in report["comparison"]}
    for figure in ("step time (s, median)", "tokens/s", "MFU"):
        row = rows[figure]
        assert 0 < row["measured"] < math.inf and 0 < row["predicted"] < math.inf, row
        # ok / out against the band, or noisy (no judgement) when the steps' spread exceeds it.
        assert row["verdict"] in ("ok", "out", "noisy") and not row["exact"], row
        assert row["within_calibrated_error"] is (None if row["verdict"] == "noisy" else row["verdict"] == "ok"), row
    assert report["noisy"] is (step["spread"] > report["calibrated_error_band"]) and step["spread"] >= 0
    assert rows["step time (s, median)"]["measured"] == step["median"]
    # Memory by category (MemTracker, one untimed step): the state exact, activations there.
    memory = {row["figure"]: row for row in report["memory_by_category"]["rows"]}
    assert all(memory[figure]["equal"] for figure in ("parameters", "gradients", "optimizer state"))
    assert memory["activations (at peak)"]["measured"] > 0
    assert memory["peak total"]["measured"] >= sum(predicted["state_bytes_per_rank"].values())
    assert rows["all-to-all time per step, transfer + wait (s)"]["measured"] == 0 == rows["all-to-all time per step, transfer + wait (s)"]["predicted"]  # one rank: no all-to-all
    load = report["measured"]["expert_load"]
    assert set(load) == {"1", "3"}  # the MoE layers of tiny-topk (every 2nd, offset 1)
    tokens = 10 * 8 * 64 * 2  # steps x batch x seq x k: every assignment is routed somewhere
    assert all(sum(layer["tokens_per_expert"]) == tokens for layer in load.values())
    # Report and plots on disk, the report equal to what was printed.
    assert json.loads((tmp_path / "report.json").read_text())["comparison"] == report["comparison"]
    for name in ("time_breakdown.png", "expert_load.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    regions = trace_region_names(tmp_path / "traces")
    assert set(regions) == {"rank0"}
    assert {"moespec::attention", "moespec::dense_ffn", "moespec::router", "moespec::experts",
            "moespec::optimizer", "moespec::grad_sync"} <= regions["rank0"]  # fmt: skip
    measured_regions = report["measured"]["region_s"]
    assert {"attention", "dense_ffn", "router", "experts", "optimizer", "grad_sync"} <= set(measured_regions)
    assert all(0 <= t < math.inf for t in measured_regions.values()) and measured_regions["attention"] > 0 and measured_regions["experts"] > 0


def test_profile_two_ranks_measures_the_predicted_all_to_all(tmp_path):
    done = run(["profile", "specs/tiny-ep.yaml", "--nproc", "2", "--json", "--out", str(tmp_path), *QUICK])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    predicted = simulate(load_plan(SPECS / "tiny-ep.yaml"), load_backend("cpu-local"))
    assert report["world"] == 2
    # By hand: each rank routes 4 x 64 = 256 tokens, top-2 over 4 experts at capacity factor
    # 1.25, so C = 1.25 * 256*2/4 = 160 slots per expert. Each all-to-all sends the other rank's
    # 2 experts' slots: 2 * 160 slots * 64 (D) * 4 bytes (fp32) = 81,920 bytes; 4 of them per
    # MoE layer (dispatch and combine, forward and backward), 2 MoE layers.
    assert report["measured"]["a2a_bytes_per_rank_microstep"] == [8 * 81_920] * 2 == [predicted["a2a_bytes_per_rank_microstep"]] * 2
    assert report["measured"]["a2a_calls_per_rank_microstep"] == [4 * 2] * 2  # 4 per MoE layer, 2 layers
    # FLOPs per rank: half of tiny-topk's (same model, half the tokens per rank; each rank's 2
    # experts serve both ranks' 2 * 2 * 160 = 640 slots, half of 1280).
    assert report["measured"]["flops_per_rank_microstep"] == [693_633_024 // 2] * 2
    assert report["exact_counts"] is True and 0 < report["measured"]["a2a_s"] < math.inf
    # MemTracker follows the step through DDP and gloo: each rank's state exact.
    memory = {row["figure"]: row for row in report["memory_by_category"]["rows"]}
    for figure, kind in (("parameters", "params"), ("gradients", "grads"), ("optimizer state", "optimizer")):
        assert memory[figure]["per_rank"] == [predicted["state_bytes_per_rank"][kind]] * 2, memory[figure]
    assert all(b > 0 for b in memory["activations (at peak)"]["per_rank"])
    step = report["measured"]["step_s"]
    assert 0 < step["min"] <= step["median"] <= step["max"] < math.inf
    regions = trace_region_names(tmp_path / "traces")
    assert set(regions) == {"rank0", "rank1"}
    assert all({"moespec::dispatch_a2a", "moespec::combine_a2a"} <= names for names in regions.values())
    # What `tensorboard --logdir` does with them: torch-tb-profiler's loader reads both ranks
    # and builds its distributed view.
    import torch_tb_profiler.io as tb_io  # the profile extra is installed by make: fail, never skip
    from torch_tb_profiler.profiler.loader import RunLoader

    tb_run = RunLoader("tiny-ep", str(tmp_path / "traces"), tb_io.Cache()).load()
    profiles = {profile.worker: profile for profile in tb_run.get_profiles()}
    assert {"rank0", "rank1"} <= set(profiles)
    for rank in ("rank0", "rank1"):
        assert {view.name for view in profiles[rank].views} >= {"overall", "operator", "trace"}
        operators = {row["name"] for row in profiles[rank].operation_table_by_name["data"]}
        assert "aten::mm" in operators


@pytest.mark.skipif(not torch_cuda_available(), reason="needs a CUDA device")
def test_profile_on_cuda_uses_cuda_events_and_peak_allocated(tmp_path):
    done = run(["profile", "specs/tiny-topk.yaml", "--device", "cuda", "--json", "--out", str(tmp_path), *QUICK])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["device"] == "cuda" and report["measured"]["memory"]["kind"] == "cuda_peak_allocated"
    assert report["measured"]["memory"]["peak_bytes"] > 0 and report["exact_counts"] is True


@pytest.mark.skipif(torch_cuda_available(), reason="checks the message on a machine without CUDA")
def test_profile_on_cuda_without_a_gpu_is_one_line():
    done = run(["profile", "specs/tiny-topk.yaml", "--device", "cuda"])
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr


def _rank_pid(rank: int, marker: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and f"RANK={rank}".encode() in environ and b"moespec" in b" ".join(cmdline):
            return int(entry.name)
    return None


@pytest.mark.parametrize("after_s", [0.0, 3.0], ids=["while-starting", "while-stepping"])
def test_a_killed_rank_ends_the_profile_with_its_name(tmp_path, after_s):
    out = tmp_path / "killed"
    proc = subprocess.Popen([*MOESPEC, "profile", "specs/tiny-ep.yaml", "--nproc", "2", "--steps", "100000", "--warmup", "0",
                             "--trace-steps", "0", "--timeout", "20", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    pid, deadline = None, time.monotonic() + 60
    while pid is None and time.monotonic() < deadline:
        time.sleep(0.5)
        pid = _rank_pid(1, str(out))
    assert pid is not None, "rank 1 never started"
    time.sleep(after_s)  # 0: during imports and gloo's set-up; 3: usually in the timed steps
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None)
    assert time.monotonic() - start < 60  # ended by the agent or the 20 s collective timeout
    assert "rank 1" in stderr, stderr
    assert not (out / "report.json").exists()  # no partial report


def test_profile_refuses_bad_input_in_one_line(tmp_path):
    run = lambda args: run_here(*args)  # noqa: E731 - refusals come before anything launches
    done = run(["profile", "specs/tiny-ep.yaml", "--out", str(tmp_path)])  # needs 2 ranks
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--nproc 2" in done.stderr and "--single-process" in done.stderr
    done = run(["profile", "specs/mixtral-8x7b.yaml"])
    assert done.returncode == 2 and "parameters" in done.stderr and "Traceback" not in done.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "backend": "cpu-local"}\n')
    done = run(["profile", "specs/tiny-topk.yaml", "--calibration", str(bad)])
    assert done.returncode == 2 and f"{bad}:1:1" in done.stderr and "Traceback" not in done.stderr


def test_calibrate_writes_a_calibration_that_validates_and_is_used(tmp_path):
    """Two threads and oneDNN products forced: BASE's equal groups leave the bmm for the thread
    engine from 12 MFLOP a product there, and the calibration says so for the cost model."""
    out = tmp_path / "cpu-local.json"
    env = dict(os.environ, MOESPEC_CPU_GEMM="onednn")
    done = run(["calibrate", "--backend", "cpu-local", "--quick", "--threads", "2", "--out", str(out), "--json"], env=env)
    assert done.returncode == 0, done.stderr
    calibration = load_calibration(out)  # raises if it does not validate
    assert calibration_errors(calibration) == []
    assert calibration["backend"] == "cpu-local" and calibration["machine"]["nproc"] == 1
    assert calibration["machine"]["threads_per_rank"] == 2 and calibration["ops"]["equal_groups_threaded_flops"] == 12_000_000
    assert 1e-4 < calibration["probe_s"] < 1.0  # the machine probe, for profile's drift check
    ops = calibration["ops"]
    assert set(ops["linear"]) == set(ops["bmm"]) == set(ops["grouped"]) == set(ops["attention"]) == {"fp32", "bf16"}
    assert all(ops[name] > 0 for name in ("op_s", "optimizer_op_s", "bandwidth_Bps", "gather_Bps"))
    # a measured grid point comes back from the database at its measured time
    grid = ops["linear"]["fp32"]
    m, k, n = (grid["axes"][axis][-1] for axis in "mkn")
    backend = apply_calibration(load_backend("cpu-local"), calibration, source=str(out))
    assert backend.ops.linear_s(0, m, k, n)[()] == pytest.approx(grid["seconds"][-1][-1][-1], rel=1e-9)
    plan = load_plan(SPECS / "tiny-topk.yaml")
    calibrated, roofline = simulate(plan, backend), simulate(plan, load_backend("cpu-local"))
    assert calibrated["time"]["overhead_s"] > 0 == roofline["time"]["overhead_s"]
    assert calibrated["assumptions"]["time_model"].startswith("operator database")
    assert roofline["assumptions"]["time_model"].startswith("roofline")
    with pytest.raises(ValueError, match="measured for backend 'cpu-local'"):
        apply_calibration(load_backend("dgx-h100"), calibration)


def test_the_shipped_calibration_validates_and_names_its_machine():
    path = shipped_calibration("cpu-local")
    assert path is not None
    calibration = load_calibration(path)
    assert calibration["machine"]["nproc"] == 2 and calibration["created"].startswith("20")
    assert calibration["measurements"]["all_to_all"] and calibration["fitted"]["link"]["latency_s"] > 0


def test_a_bad_calibration_is_a_located_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "backend": "cpu-local", "created": "x", "machine": {}, "fitted": {}, "measurements": {},
                               "fit_error": {}, "extra": 1}, indent=2))  # fmt: skip
    with pytest.raises(SpecErrors) as caught:
        load_calibration(bad)
    lines = [error.format() for error in caught.value.errors]
    assert any(line.startswith(f"{bad}:") and "extra" in line for line in lines)
