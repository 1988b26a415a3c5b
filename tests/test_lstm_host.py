"""Shazeer et al. 2017's host: MoE layers between stacked LSTM layers (model.host: lstm). The
spec's refusals, training, and the simulator's fitted parts (saved activations, op list)
against the model's traces; parameters and FLOPs are checked with every spec in
test_sim_counts.py, expert parallelism in test_distributed.py's lstm case."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_here import run_here
import torch
import yaml

from moespec.model.build import build_model
from moespec.spec import load_plan, plan_from_text

ROOT = Path(__file__).resolve().parents[1]


def moespec_cli(*args: str) -> subprocess.CompletedProcess:
    return run_here(*args)


@pytest.mark.parametrize("edit,key", [
    (lambda d: d["model"].update(n_heads=4), "model.n_heads"),
    (lambda d: d["model"].update(positions="rope"), "model.positions"),
    (lambda d: d["model"].update(norm="layernorm"), "model.norm"),
    (lambda d: d["parallelism"].update(recompute="full"), "parallelism.recompute"),
], ids=["heads", "positions", "norm", "recompute"])  # fmt: skip
def test_keys_an_lstm_host_has_no_use_for_are_refused(tmp_path, edit, key):
    data = yaml.safe_load((ROOT / "specs/tiny-lstm-moe.yaml").read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    done = moespec_cli("validate", str(path))
    assert done.returncode == 2 and f"{key}:" in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_a_transformer_still_needs_its_heads(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("version: 1\nname: x\nmodel: {vocab_size: 256, d_model: 32, n_layers: 2}\n")
    done = moespec_cli("validate", str(path))
    assert done.returncode == 2 and "missing required key 'n_heads'" in done.stderr


def test_parameters_are_torch_lstm_s():
    """Each layer holds what nn.LSTM(D, D) holds (weight_ih, weight_hh, two biases)."""
    plan = load_plan(ROOT / "specs/tiny-lstm-moe.yaml")
    model = build_model(plan)
    d = plan.model.d_model
    assert sum(p.numel() for p in model.blocks[1].parameters()) == sum(p.numel() for p in torch.nn.LSTM(d, d).parameters())


def test_noisy_top2_lstm_moe_trains():
    done = moespec_cli("train", str(ROOT / "specs/tiny-lstm-moe.yaml"), "--steps", "40", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["final_val_loss"] < report["initial_val_loss"] - 1.0, report  # 5.55 -> ~3.5
    assert set(report["records"][0]["dropped_fraction"]) == {"0"}  # one MoE layer, after LSTM layer 0


@pytest.mark.parametrize("edit", [
    lambda d: d.pop("moe"),
    lambda d: (d.pop("moe"), d["model"].update(n_layers=3, seq_len=40)),
    lambda d: (d.pop("moe"), d["parallelism"].update(precision="bf16")),
    lambda d: None,
    lambda d: d["model"].update(dropout=0.1),
], ids=["dense", "deeper-shorter", "dense-bf16", "moe", "moe-dropout"])  # fmt: skip
def test_saved_activations_equal_the_trace(tmp_path, edit):
    """Exact on these; a MoE layer under bf16 is 5.7% over (its input is in the compute
    dtype here, float32 after a transformer's norm): not in this list, said in the README."""
    from test_activation_bytes import predicted_saved_bytes, traced_saved_bytes

    data = yaml.safe_load((ROOT / "specs/tiny-lstm-moe.yaml").read_text())
    data["moe"]["router"] = {"type": "topk", "k": 2}  # noisy top-k's [T, E] tensors are checked in test_activation_bytes.py
    edit(data)
    plan = plan_from_text(yaml.safe_dump(data), "lstm")
    assert predicted_saved_bytes(plan) == pytest.approx(traced_saved_bytes(plan), rel=0.005)


LSTM_OPS = """
version: 1
name: lops
model: {{host: lstm, vocab_size: 64, d_model: 16, n_layers: {layers}, d_ff: 32, seq_len: {seq} {model}}}
{moe}
parallelism: {{micro_batch: 2 {parallel}}}
"""
MOE = "moe: {placement: {type: layers, layers: [0]}, experts: {count: 4, d_ff: 16}, router: {type: noisy_topk, k: 2}, capacity: {factor: 2.0}}"


@pytest.mark.parametrize("layers,seq,model,moe,parallel", [
    (1, 8, "", "", ""), (3, 12, "", "", ""), (2, 16, "", MOE, ""),  # fitted on (with others)
    (2, 16, "", MOE, ", precision: bf16, global_batch: 4"), (3, 8, ", dropout: 0.1, activation: swiglu", MOE, ""),  # not fitted on
], ids=["1x8", "3x12", "moe-2x16", "moe-bf16-accum", "moe-dropout-swiglu"])  # fmt: skip
def test_op_list_matches_the_dispatched_ops(layers, seq, model, moe, parallel):
    """LSTM_* constants (sim/ops.py) were fitted on dense models of 1-3 layers and 8-16 steps,
    fp32, bf16 and dropout, and on the MoE model 1x8; the last two cases were not fitted on."""
    from moespec.profiling.optrace import trace_step_ops
    from moespec.sim import ops, tensors
    from moespec.sim.design import DesignBatch

    plan = plan_from_text(LSTM_OPS.format(layers=layers, seq=seq, model=model, moe=moe, parallel=parallel), "lops")
    traced = trace_step_ops(plan)
    batch = DesignBatch.from_plans([plan])
    assert int(tensors.param_tensors(batch)[0]) == len(list(build_model(plan).parameters()))
    assert traced["optimizer"] == ops.OPTIMIZER_OPS + ops.OPTIMIZER_OPS_PER_TENSOR * int(tensors.trained_tensors(batch)[0])
    host = float(ops.other_ops(batch)[0][0]) * plan.parallel.grad_accum
    assert abs(host - traced["other"]) <= 0.02 * traced["other"], (host, traced["other"])
