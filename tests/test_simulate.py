"""`moespec simulate`: exact counts equal to the compiled model, and the memory and time
model behaving as its stated assumptions say."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from moespec.sim.backend import load_backend
from moespec.sim.model import memory_per_device, simulate, step_time
from moespec.spec import load_plan

ROOT = Path(__file__).resolve().parents[1]


def moespec(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "moespec", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def with_parallel(plan, **fields):
    return dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, **fields))


def test_simulate_json_counts_equal_compile_json():
    sim = moespec("simulate", "specs/tiny-mixed.yaml", "--backend", "cpu-local", "--json")
    compiled = moespec("compile", "specs/tiny-mixed.yaml", "--json")
    assert sim.returncode == 0 and compiled.returncode == 0, sim.stderr + compiled.stderr
    predicted, built = json.loads(sim.stdout)["params"], json.loads(compiled.stdout)["params"]
    assert (predicted["total"], predicted["active"]) == (built["total"], built["active"])


def test_all_to_all_time_jumps_when_ep_crosses_the_node_boundary():
    """OLMoE-style 64 experts on 4 x 8 H100: ep 8 stays on NVSwitch, ep 16 and 32 go over IB."""
    plan = load_plan(ROOT / "specs/olmoe-1b-7b.yaml")
    backend = load_backend("h100-cluster-4n")
    a2a = {ep: step_time(with_parallel(plan, dp=32, ep=ep, global_batch=1024), backend).a2a_s for ep in (2, 4, 8, 16, 32)}
    assert a2a[2] < a2a[4] < a2a[8]  # more of each rank's rows leave it, all on NVLink
    assert a2a[16] > 4 * a2a[8]  # NVLink 360 GB/s effective vs a 45 GB/s NIC
    assert a2a[32] >= a2a[16]


def test_zero_shards_optimizer_state_and_expert_parallel_shards_experts():
    plan = with_parallel(load_plan(ROOT / "specs/mixtral-8x7b.yaml"), dp=8, ep=8, global_batch=64)
    backend = load_backend("dgx-h100")
    zero0 = memory_per_device(with_parallel(plan, zero_stage=0), backend)
    zero1 = memory_per_device(with_parallel(plan, zero_stage=1), backend)
    experts = 32 * 8 * 3 * 4096 * 14336
    dense = 46_702_792_704 - experts
    # bf16 weights: dense replicated + 1 of 8 experts per layer; ZeRO-1 leaves weights alone.
    assert zero0.weights_bytes == zero1.weights_bytes == (dense + experts / 8) * 2
    # 12 bytes of optimizer state (fp32 master, m, v). ep = dp: experts have no replicas, so
    # ZeRO-1 shards only the dense state over the 8 ranks.
    assert zero0.optimizer_bytes == (dense + experts / 8) * 12
    assert zero1.optimizer_bytes == (dense / 8 + experts / 8) * 12


def test_a_design_that_does_not_fit_is_flagged():
    plan = with_parallel(load_plan(ROOT / "specs/mixtral-8x7b.yaml"), dp=8, ep=1, global_batch=64, zero_stage=0)
    memory = memory_per_device(plan, load_backend("dgx-h100"))
    assert not memory.fits and memory.total_bytes > 16 * 46e9  # 16 bytes per parameter, unsharded
    result = moespec("simulate", "specs/mixtral-8x7b.yaml", "--backend", "dgx-h100", "--world", "8")
    assert result.returncode == 0 and "does NOT fit" in result.stdout


def test_report_is_one_json_document_with_a_time_breakdown():
    report = simulate(load_plan(ROOT / "specs/tiny-ep.yaml"), load_backend("cpu-local"))
    time = report["time"]
    parts = time["compute_s"] + time["elementwise_s"] + time["overhead_s"] + time["a2a_s"] + time["tp_comm_s"] + time["pp_comm_s"] + time["exposed_allreduce_s"] + time["bubble_s"] + time["optimizer_s"]
    assert abs(time["step_s"] - parts) < 1e-12 and time["a2a_s"] > 0
    assert 0 < time["mfu"] < 1


def test_bad_backend_and_world_are_one_line_exit_2(tmp_path):
    missing = moespec("simulate", "specs/tiny-topk.yaml", "--backend", "dgx-h10")
    assert missing.returncode == 2 and "did you mean 'dgx-h100'" in missing.stderr and "Traceback" not in missing.stderr
    too_big = moespec("simulate", "specs/mixtral-8x7b.yaml", "--backend", "dgx-h100")
    assert too_big.returncode == 2 and "needs 64 devices; backend dgx-h100 has 8" in too_big.stderr
    odd = moespec("simulate", "specs/mixtral-8x7b.yaml", "--backend", "dgx-h100", "--world", "12")
    assert odd.returncode == 2 and "which parallelism.ep (8) does not divide" in odd.stderr


def test_imbalance_slows_dropless_experts_and_a2a_only():
    backend = load_backend("h100-cluster-4n")
    dropless = with_parallel(load_plan(ROOT / "specs/olmoe-1b-7b.yaml"), dp=32, ep=8, global_batch=1024)
    even, skewed = step_time(dropless, backend), step_time(dropless, backend, imbalance=1.5)
    assert abs(skewed.a2a_s / even.a2a_s - 1.5) < 0.01  # the same volume x 1.5 (plus equal latency)
    assert skewed.compute_s > even.compute_s
    capacity = with_parallel(load_plan(ROOT / "specs/switch-base-8.yaml"), dp=8, ep=8, global_batch=256)
    dgx = load_backend("dgx-h100")
    assert step_time(capacity, dgx, imbalance=2.0) == step_time(capacity, dgx)


def test_flops_by_part_sum_to_the_exact_total():
    from moespec.sim.counts import predict_step_flops, step_flops_by_part

    for name in ("tiny-mixed", "qwen1.5-moe-a2.7b", "deepseek-moe-16b"):
        plan = load_plan(ROOT / "specs" / f"{name}.yaml")
        parts = step_flops_by_part(plan)
        assert sum(parts.values()) == predict_step_flops(plan)
    assert {"attention", "dense_ffn", "router", "experts_dropless", "shared_experts", "lm_head"} <= set(step_flops_by_part(plan))


def test_recomputation_adds_the_forward_it_repeats():
    plan = with_parallel(load_plan(ROOT / "specs/switch-base-8.yaml"), recompute="none")
    backend = load_backend("dgx-h100")
    none = step_time(plan, backend).compute_s
    full = step_time(with_parallel(plan, recompute="full"), backend).compute_s
    selective = step_time(with_parallel(plan, recompute="selective"), backend).compute_s
    assert abs(full / none - 4 / 3) < 1e-9  # compute-bound: the forward is a third of the step
    assert none < selective < full


def test_tensor_and_pipeline_parallel_pay_for_their_traffic():
    """tp all-reduces activations 4 times per block; beyond a node (8 GPUs) they cross the
    NICs and cost far more per byte. pp sends activations between neighbouring stages."""
    backend = load_backend("h100-cluster-4n")
    plan = load_plan(ROOT / "specs/olmoe-1b-7b.yaml")
    base = step_time(with_parallel(plan, dp=1, ep=1, tp=1, pp=1, global_batch=plan.parallel.micro_batch), backend)
    assert base.tp_comm_s == base.pp_comm_s == 0.0
    in_node = step_time(with_parallel(plan, dp=1, ep=1, tp=8, pp=1, global_batch=plan.parallel.micro_batch), backend)
    across = step_time(with_parallel(plan, dp=1, ep=1, tp=16, pp=1, global_batch=plan.parallel.micro_batch), backend)
    assert in_node.tp_comm_s > 0
    assert across.tp_comm_s > 3 * in_node.tp_comm_s  # NIC bandwidth is ~1/9 of NVLink's per GPU
    piped = step_time(with_parallel(plan, dp=1, ep=1, tp=1, pp=4, global_batch=8 * plan.parallel.micro_batch), backend)
    assert piped.pp_comm_s > 0 and piped.bubble_s > 0
