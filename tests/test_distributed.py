"""Real ranks over gloo on CPU (world 2 and 4): parity with one process, faults, the launcher."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from moespec.distributed.launch import launch
from moespec.distributed.parity import parity_worker, plan_fields, plan_from_fields
from moespec.sim.counts import predict_a2a_bytes
from moespec.spec import load_plan
from moespec.spec.plan import (
    BaseRouter,
    CapacityPlan,
    ExpertChoiceRouter,
    HashRouter,
    NoisyTopKRouter,
    SigmoidBiasRouter,
    SinkhornRouter,
    SparseMixerRouter,
    SwitchRouter,
    TopKRouter,
)

ROOT = Path(__file__).resolve().parents[1]
CAPACITY = CapacityPlan(factor=1.25, eval_factor=2.0, min_capacity=4, drop_policy="position", dropless=False)
DROPLESS = CapacityPlan(factor=None, eval_factor=None, min_capacity=4, drop_policy="position", dropless=True)
# Tight capacity so that tokens really are dropped (and the drop path is compared too).
TIGHT = CapacityPlan(factor=0.5, eval_factor=0.5, min_capacity=1, drop_policy="probability", dropless=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def variant(*, dp: int, ep: int, router, capacity, n_experts: int = 4):
    """tiny-topk with every MoE layer set to this router/capacity, at dp x ep."""
    plan = load_plan(ROOT / "specs/tiny-topk.yaml")
    layers = []
    for layer in plan.layers:
        if layer.moe is not None:
            experts = dataclasses.replace(layer.moe.experts, count=n_experts)
            cap = None if isinstance(router, BaseRouter) else capacity
            layer = dataclasses.replace(layer, moe=dataclasses.replace(layer.moe, router=router, experts=experts, capacity=cap))
        layers.append(layer)
    parallel = dataclasses.replace(plan.parallel, dp=dp, ep=ep, micro_batch=2, global_batch=2 * dp)
    model = dataclasses.replace(plan.model, seq_len=32)
    return dataclasses.replace(plan, layers=tuple(layers), parallel=parallel, model=model)


ROUTERS = {
    "topk": TopKRouter(k=2, z_loss_coef=0.001),
    "noisy_topk": NoisyTopKRouter(k=2),
    "switch": SwitchRouter(jitter_eps=0.01, z_loss_coef=0.001),
    "base": BaseRouter(shuffle=False),  # the shuffle is checked on its own below
    "sinkhorn": SinkhornRouter(),
    "expert_choice": ExpertChoiceRouter(),
    "hash": HashRouter(),
    "sigmoid_bias": SigmoidBiasRouter(k=2, n_groups=2, topk_groups=1),
    "sparsemixer": SparseMixerRouter(k=2, jitter_eps=0.2),  # sampled in training: the same stream on both sides
}


def cases(dp: int, ep: int) -> list[tuple[str, dict]]:
    out = []
    for name, router in ROUTERS.items():
        modes = [("capacity", CAPACITY)] if name in ("base", "expert_choice") else [("capacity", CAPACITY), ("dropless", DROPLESS)]
        for mode, capacity in modes:
            out.append((f"{name}-{mode}", plan_fields(variant(dp=dp, ep=ep, router=router, capacity=capacity))))
    out.append(("topk-tight-probability", plan_fields(variant(dp=dp, ep=ep, router=ROUTERS["topk"], capacity=TIGHT))))
    out.append(("t5-switch-capacity", plan_fields(encoder_decoder(dp=dp, ep=ep))))
    out.append(("lstm-noisy-capacity", plan_fields(lstm_host(dp=dp, ep=ep))))
    return out


def lstm_host(*, dp: int, ep: int):
    """tiny-lstm-moe (noisy top-2 of 8 between two LSTM layers) at dp x ep."""
    plan = load_plan(ROOT / "specs/tiny-lstm-moe.yaml")
    return dataclasses.replace(plan, model=dataclasses.replace(plan.model, seq_len=16),
                               parallel=dataclasses.replace(plan.parallel, dp=dp, ep=ep, micro_batch=2, global_batch=2 * dp))  # fmt: skip


def encoder_decoder(*, dp: int, ep: int):
    """tiny-t5-switch (experts in both stacks, T5's relative bias, cross-attention) at dp x ep."""
    plan = load_plan(ROOT / "specs/tiny-t5-switch.yaml")
    model = dataclasses.replace(plan.model, seq_len=16, encoder=dataclasses.replace(plan.model.encoder, seq_len=24))
    return dataclasses.replace(plan, model=model, parallel=dataclasses.replace(plan.parallel, dp=dp, ep=ep, micro_batch=2, global_batch=2 * dp))


def run_parity(world: int, dp: int, ep: int, tmp_path: Path, device: str = "cpu") -> list[list[dict]]:
    mp.spawn(parity_worker, args=(world, free_port(), cases(dp, ep), str(tmp_path), device), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dp,ep", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "dp4-ep2"])
def test_distributed_step_equals_single_process(dp, ep, tmp_path):
    results = run_parity(dp, dp, ep, tmp_path)
    # The simulator predicts the bytes the layer measured, exactly where routing cannot change
    # them: capacity buffers and BASE's exact balance (REFERENCE sec. 4).
    plans = {name: plan_from_fields(fields) for name, fields in cases(dp, ep)}
    for rank_results in results:
        for result in rank_results:
            if result["case"].endswith("capacity") or "tight" in result["case"]:
                assert result["a2a_bytes"] == predict_a2a_bytes(plans[result["case"]]), result["case"]
    for rank_results in results:
        for result in rank_results:
            label = f"{result['case']} rank {result['rank']}"
            assert result["loss_ok"], f"{label}: loss {result['loss']} vs {result['reference_loss']}"
            assert not result["mismatched"], f"{label}: gradients differ: {result['mismatched']} (max {result['max_rel_grad_diff']:.2e} of scale)"
            assert not result["missing"], f"{label}: no gradient for {result['missing']}"
    # All-to-all bytes in capacity mode are fixed (REFERENCE sec. 4): per MoE layer, dispatch and
    # combine, forward and backward: 4 * E*C*D*4 bytes * (ep-1)/ep. tiny: T = 2*32 = 64 tokens.
    by_case = {r["case"]: r for r in results[0]}
    n_layers, E, D, T, k = 2, 4, 64, 64, 2
    C = max(-(-k * T * 5 // (E * 4)), 4)  # ceil(k * T / E * 1.25)
    assert by_case["topk-capacity"]["a2a_bytes"] == n_layers * 4 * (E * C * D * 4) * (ep - 1) // ep
    # Collectives, counted by torch's CommDebugMode over forward + backward: per MoE layer a
    # dispatch and a combine all-to-all each way (4); dropless adds one count exchange.
    assert by_case["topk-capacity"]["all_to_all_calls"] == n_layers * 4
    assert by_case["topk-dropless"]["all_to_all_calls"] == n_layers * 5


@pytest.mark.timeout(600)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL expert parallelism needs 2 GPUs (one rank per GPU)")
def test_nccl_step_equals_single_process(tmp_path):
    for rank_results in run_parity(2, 2, 2, tmp_path, device="cuda"):
        for result in rank_results:
            assert result["loss_ok"] and not result["mismatched"], result


def _launch_fault(mode: str, timeout_s: float) -> tuple[int, str, float]:
    start = time.monotonic()
    code, message = launch(
        2, [str(ROOT / "tests/fault_worker.py"), mode, str(ROOT / "specs/tiny-ep.yaml"), str(timeout_s)],
        timeout_s=120, module=False,
    )  # fmt: skip
    return code, message or "", time.monotonic() - start


@pytest.mark.timeout(180)
def test_a_rank_that_raises_ends_every_rank_and_is_named():
    code, message, elapsed = _launch_fault("raise", timeout_s=30)
    assert code != 0
    assert message.startswith("rank 1 failed: RuntimeError: injected failure"), message
    assert elapsed < 30, "the other rank must not wait for the collective timeout"


@pytest.mark.timeout(180)
def test_a_hung_collective_times_out_on_every_rank():
    code, message, elapsed = _launch_fault("hang", timeout_s=5)
    assert code != 0
    assert message.startswith("rank 0 failed:"), message  # rank 0 waited in the collective
    assert message.endswith("rank(s) 1 never joined: look there for the hang"), message
    assert elapsed < 60


@pytest.mark.timeout(300)
def test_train_nproc_2_trains_with_falling_loss():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "moespec", "train", "specs/tiny-ep.yaml", "--steps", "20", "--nproc", "2", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)
    assert document["world"] == 2
    assert document["last_loss"] < document["first_loss"] - 0.5
    # Loads are summed over both ranks: 2 ranks * 20 steps * T * k assignments per layer.
    for counts in document["tokens_per_expert_total"].values():
        assert sum(counts) == 2 * 20 * 4 * 64 * 2


def test_train_nproc_that_does_not_fit_the_spec_is_refused():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "moespec", "train", "specs/tiny-ep.yaml", "--steps", "1", "--nproc", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "needs world = pp * tp * dp = 1 * 1 * 2 = 2 ranks but 3 were launched" in result.stderr


def _train_json(spec: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "moespec", "train", str(spec), "--json", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.timeout(300)
def test_base_layer_with_token_shuffle_trains_exactly_balanced(tmp_path):
    """BASE shuffles tokens across the EP group before its balanced assignment (Lewis 2021);
    the shuffled groups must still give every expert exactly T/E tokens on every rank."""
    text = (ROOT / "specs/tiny-ep.yaml").read_text()
    text = text.replace("name: tiny-ep", "name: tiny-ep-base").replace("router: {type: topk, k: 2}", "router: {type: base, shuffle: true}")
    spec = tmp_path / "tiny-ep-base.yaml"
    spec.write_text("\n".join(line for line in text.splitlines() if "capacity:" not in line) + "\n")
    document = _train_json(spec, "--steps", "10", "--nproc", "2")
    assert document["last_loss"] < document["first_loss"] - 0.5
    for record in document["records"]:
        for counts in record["tokens_per_expert"].values():
            assert counts == [2 * 4 * 64 // 4] * 4  # 2 ranks x T = 256 tokens, 4 experts
