"""The edges of the CLI (issue 17): output paths are checked before any work, `--json` is
always JSON, numeric flags have ranges, files are written with the user's umask. Each case is
one line on stderr and exit code 2, never a traceback; all run in this process."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cli_here import run_here

from moespec.cli.common import emit_json
from moespec.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
SWEEP = SPECS / "sweeps" / "cpu-tiny.yaml"


def refused(done, *needles: str) -> None:
    """Exit 2 and one line: `error: ...`, or a file's own `FILE:LINE:COL: path: ...`."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and (done.stderr.startswith("error: ") or ":1:1: " in done.stderr), done.stderr
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)


def test_output_paths_are_checked_before_the_work(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    refused(run_here("explore", SWEEP, "--out", a_file), "--out", "is a file")
    refused(run_here("explore", SWEEP, "--emit", a_file), "--emit", "is a file")
    refused(run_here("explore", SWEEP, "--out", a_file / "below"), "not a folder")
    refused(run_here("profile", SPECS / "tiny-topk.yaml", "--out", a_file), "--out", "is a file")
    refused(run_here("calibrate", "--backend", "cpu-local", "--out", tmp_path), "--out", "give a file name")
    refused(run_here("compile", SPECS / "tiny-topk.yaml", "--out", ""), "--out needs a folder name")
    refused(run_here("train", SPECS / "tiny-topk.yaml", "--steps", "1", "--save", a_file), "--save", "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written, no probe left


def test_json_never_holds_infinity(capsys):
    emit_json({"time": {"step_s": float("inf"), "parts": [1.0, float("nan")]}, "name": "x"})
    document = json.loads(capsys.readouterr().out)  # strict parsers refuse Infinity; json.loads takes it, so check the text too
    assert document["time"] == {"step_s": None, "parts": [1.0, None]}
    assert document["non_finite"]["paths"] == ["time.step_s", "time.parts[1]"]


def test_numeric_flags_have_ranges():
    tiny = SPECS / "tiny-topk.yaml"
    refused(run_here("simulate", tiny, "--backend", "cpu-local", "--imbalance", "inf"), "--imbalance")
    refused(run_here("train", tiny, "--steps", "1", "--seed", str(2**64)), "--seed")
    refused(run_here("train", tiny, "--steps", "1", "--batch", "1000000000"), "--batch")
    for timeout in ("inf", "1e308", "1e-9", "nan"):
        refused(run_here("train", tiny, "--steps", "1", "--timeout", timeout), "--timeout")
    refused(run_here("train", SPECS / "tiny-ep.yaml", "--steps", "-1", "--nproc", "2"), "--steps")
    refused(run_here("train", tiny, "--steps", "1", "--save-every", "5"), "--save-every needs --save")
    refused(run_here("train", tiny, "--steps", "1", "--nnodes", "2"), "--rdzv-endpoint")
    import torch

    if not torch.cuda.is_available():
        refused(run_here("train", tiny, "--steps", "1", "--device", "cuda"), "no CUDA device")


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    write_atomic(tmp_path / "b.json", "{}")
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o666 & ~old


@pytest.mark.parametrize("axis", ["{start: 1.0, stop: 2.0, step: 1.0e-320}", "{start: -1.0e308, stop: 1.0e308, step: 1.0}",
                                  "{start: 1.0e-300, stop: 1.0e300, factor: 1.0000001}"])  # fmt: skip
def test_sweep_ranges_too_large_to_count_are_refused_from_the_arithmetic(axis, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    text = SWEEP.read_text().replace("moe.capacity.factor: [1.0, 1.25, 2.0]", f"moe.capacity.factor: {axis}")
    sweep.write_text(text.replace("base: ../tiny-topk.yaml", f"base: {SPECS / 'tiny-topk.yaml'}"))
    done = run_here("explore", sweep)
    assert done.returncode == 2 and "this range has" in done.stderr and "use a coarser step or factor" in done.stderr, done.stderr


def test_empty_and_undecodable_files_say_what_they_should_hold(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "a backend needs" in run_here("simulate", SPECS / "tiny-topk.yaml", "--backend", empty).stderr
    assert "a sweep needs" in run_here("explore", empty).stderr
    binary = tmp_path / "cal.json"
    binary.write_bytes(b"\xff\xfe{}")
    done = run_here("simulate", SPECS / "tiny-topk.yaml", "--backend", "cpu-local", "--calibration", binary)
    refused(done, "not UTF-8")
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20))
    refused(run_here("simulate", SPECS / "tiny-topk.yaml", "--backend", "cpu-local", "--calibration", big), "limit for a calibration")


def test_a_described_cluster_is_costed_for_the_ranks_the_run_uses(tmp_path):
    """65,536 nodes x 1,024 devices validate; a 64-rank run builds the topology of one node."""
    huge = tmp_path / "huge.yaml"
    text = (ROOT / "backends" / "h100-cluster-4n.yaml").read_text()
    huge.write_text(text.replace("nodes: 4\n", "nodes: 65536\n").replace("devices_per_node: 8\n", "devices_per_node: 1024\n"))
    done = run_here("simulate", SPECS / "mixtral-8x7b.yaml", "--backend", huge, "--world", "64", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["time"]["step_s"] > 0


def test_a_profile_stopped_midway_leaves_neither_report_nor_traces(tmp_path):
    """Ctrl-C once the traced steps are written, while the trace's events are read: the run has
    no report, so its traces go too. The invariant checked: traces exist exactly when the
    report does (the interrupt lands in that window on this machine; were it late, both stay)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "p"
    proc = subprocess.Popen([sys.executable, "-m", "moespec", "profile", str(SPECS / "tiny-topk.yaml"), "--steps", "10",
                             "--warmup", "0", "--trace-steps", "25", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(p.is_file() for p in (out / "traces").rglob("*")) and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()  # never left running past the test
    traces = [p for p in (out / "traces").rglob("*") if p.is_file()]
    assert (out / "report.json").exists() == bool(traces), (proc.returncode, traces)
