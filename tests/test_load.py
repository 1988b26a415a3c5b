"""Expert load models (moespec/sim/load.py): balanced, a parametric skew worked out by hand,
and a skewed router measured on 2 real ranks, whose per-rank all-to-all bytes the simulator
then predicts from the measured histograms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moespec.sim.backend import load_backend
from moespec.sim.load import a2a_bytes_per_rank, balanced_load, imbalance_factors, zipf_load
from moespec.sim.model import simulate
from moespec.spec import load_plan, plan_from_text

ROOT = Path(__file__).resolve().parents[1]


def moespec(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "moespec", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def dropless_ep(router: str = "{type: topk, k: 2}") -> str:
    text = (ROOT / "specs/tiny-ep.yaml").read_text()  # dp 2, ep 2, 4 experts, T = 4 * 64
    return text.replace("router: {type: topk, k: 2}", f"router: {router}").replace(
        "capacity: {factor: 1.25, eval_factor: 2.0}", "capacity: {dropless: true}")


def test_balanced_load_is_the_cost_models_balance():
    plan = plan_from_text(dropless_ep(), "dropless-ep")
    load = balanced_load(plan)
    assert imbalance_factors(plan, load) == {"compute_imbalance": 1.0, "a2a_imbalance": 1.0}
    # 2 MoE layers x 4 transfers x T*k*(P-1)/P = 256 rows of 64 fp32 values.
    assert a2a_bytes_per_rank(plan, load, 4) == [2 * 4 * 256 * 64 * 4] * 2 == [simulate(plan, load_backend("cpu-local"))["a2a_bytes_per_rank_microstep"]] * 2


def test_zipf_skew_worked_by_hand():
    """4 experts, s = 1: shares 1, 1/2, 1/3, 1/4 over 25/12, i.e. 12/25, 6/25, 4/25, 3/25.
    Rank 0 holds experts 0 and 1 (18/25 of every source's rows), rank 1 the other 7/25:
    rank 0 computes 2 * 18/25 of one rank's rows (1.44x the mean) and receives 18/25 of
    rank 1's rows where balance would send 1/2 (1.44x)."""
    plan = plan_from_text(dropless_ep(), "dropless-ep")
    factors = imbalance_factors(plan, zipf_load(plan, 1.0))
    assert factors["compute_imbalance"] == pytest.approx(1.44, rel=1e-12)
    assert factors["a2a_imbalance"] == pytest.approx(1.44, rel=1e-12)
    backend = load_backend("h100-cluster-4n")
    skewed, even = simulate(plan, backend, load=zipf_load(plan, 1.0)), simulate(plan, backend)
    assert skewed["time"]["a2a_s"] > even["time"]["a2a_s"] and skewed["time"]["compute_s"] > even["time"]["compute_s"]
    assert skewed["load"]["a2a_bytes_per_rank_microstep"] == pytest.approx([2 * 2 * (7 + 18) / 25 * 512 * 64 * 4] * 2, rel=1e-12)


@pytest.mark.timeout(600)
def test_measured_skew_predicts_each_ranks_all_to_all_bytes(tmp_path):
    """A hash router on byte text is skewed (bytes are far from uniform); dropless, on 2
    ranks: each rank's bytes follow its own routing, and the histograms the profile measured
    give them back exactly (integer totals; the per-micro-step mean is a float: 1e-12)."""
    spec = tmp_path / "hash-ep.yaml"
    spec.write_text(dropless_ep("{type: hash}").replace("name: tiny-ep", "name: hash-ep"))
    out = tmp_path / "profile"
    result = moespec("profile", str(spec), "--nproc", "2", "--steps", "10", "--warmup", "1", "--trace-steps", "0", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    measured = [r["a2a_bytes_per_microstep"] for r in json.loads(result.stdout)["ranks"]]
    predicted = json.loads(moespec("simulate", str(spec), "--backend", "cpu-local", "--load", str(out / "report.json"), "--json").stdout)
    assert predicted["load"]["a2a_bytes_per_rank_microstep"] == pytest.approx(measured, rel=1e-12)
    balanced = predicted["a2a_bytes_per_rank_microstep"]
    assert max(measured) > balanced  # the skew is real: some rank sends more than balance says
    assert predicted["load"]["a2a_imbalance"] > 1 and predicted["load"]["compute_imbalance"] > 1
    # A report of another layout is refused in one line.
    other = moespec("simulate", "specs/tiny-ep.yaml", "--backend", "cpu-local", "--world", "1", "--ep", "1", "--load", str(out / "report.json"))
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "measured at world 2, ep 2" in other.stderr
