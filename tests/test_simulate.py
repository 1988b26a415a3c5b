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


# Mixtral-8x7B by hand: 32 blocks of attention 4096*(4096+2*1024) + 4096*4096 = 41,943,040,
# two RMSNorms 8,192 and a router 8*4096 = 32,768; embedding and untied head 32000*4096 each
# and a final norm 4,096: dense 1,605,636,096. Experts: 8 * 3 * 4096 * 14336 per block.
MIXTRAL_DENSE = 32 * (41_943_040 + 8_192 + 32_768) + 2 * 131_072_000 + 4_096
MIXTRAL_EXPERT_PER_LAYER = 3 * 4096 * 14336  # one expert


def test_zero_shards_state_as_the_runtime_holds_it():
    """fp32 parameters and gradients and 8 bytes of AdamW state per parameter at every
    precision; ZeRO shards by rows (FSDP2's Shard(0)): dense over dp, experts over dp/ep."""
    assert MIXTRAL_DENSE + 32 * 8 * MIXTRAL_EXPERT_PER_LAYER == 46_702_792_704
    plan = with_parallel(load_plan(ROOT / "specs/mixtral-8x7b.yaml"), dp=8, ep=8, global_batch=64)
    backend = load_backend("dgx-h100")
    local_experts = 32 * MIXTRAL_EXPERT_PER_LAYER  # ep 8: one expert per block
    zero0 = memory_per_device(with_parallel(plan, zero_stage=0), backend)
    zero1 = memory_per_device(with_parallel(plan, zero_stage=1), backend)
    assert zero0.weights_bytes == zero1.weights_bytes == 4 * (MIXTRAL_DENSE + local_experts)
    assert zero0.optimizer_bytes == 8 * (MIXTRAL_DENSE + local_experts)
    # ep = dp: experts have no replicas (dp/ep = 1); every dense dim divides by 8 here.
    assert zero1.optimizer_bytes == 8 * (MIXTRAL_DENSE // 8 + local_experts)
    # dp 16: a [8, 4096] router keeps a whole row on rank 0 (ceil(8/16) = 1, not half a row);
    # one local expert [1, 4096, 14336] over dp/ep = 2 ranks cannot split by expert, so it
    # splits by its second dim (4096 or 14336 rows): exactly half on each.
    zero3 = simulate(with_parallel(plan, dp=16, ep=8, zero_stage=3, global_batch=128), load_backend("h100-cluster-4n"))
    shard = MIXTRAL_DENSE // 16 + 32 * (4096 - 8 * 4096 // 16) + local_experts // 2
    assert zero3["state_bytes_per_rank"] == {"params": 4 * shard, "grads": 4 * shard, "optimizer": 8 * shard}


def test_a_design_that_does_not_fit_is_flagged():
    plan = with_parallel(load_plan(ROOT / "specs/mixtral-8x7b.yaml"), dp=8, ep=1, global_batch=64, zero_stage=0)
    memory = memory_per_device(plan, load_backend("dgx-h100"))
    assert not memory.fits and memory.total_bytes > 16 * 46e9  # 16 bytes per parameter, unsharded
    result = moespec("simulate", "specs/mixtral-8x7b.yaml", "--backend", "dgx-h100", "--world", "8")
    assert result.returncode == 0 and "does NOT fit" in result.stdout


def test_compute_time_is_the_flops_at_the_backend_rate():
    """A compute-bound full-size design: compute time is the step's FLOPs over the datasheet
    peak times the efficiency written in backends/dgx-h100.yaml (989 TFLOP/s bf16, 0.7)."""
    plan = with_parallel(load_plan(ROOT / "specs/mixtral-8x7b.yaml"), dp=8, ep=8, global_batch=16, micro_batch=1,
                         recompute="none")  # fmt: skip
    report = simulate(plan, load_backend("dgx-h100"))
    flops = report["step_flops_per_rank_microstep"] * 2  # 16 / (1 * 8) micro-steps
    assert abs(report["time"]["compute_s"] / (flops / (989e12 * 0.7)) - 1) < 1e-12
    assert 0 < report["time"]["mfu"] < 0.7


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


def test_flops_by_part_name_the_parts_a_model_has():
    from moespec.sim.counts import step_flops_by_part

    plan = with_parallel(load_plan(ROOT / "specs/deepseek-moe-16b.yaml"), recompute="none")
    assert set(step_flops_by_part(plan)) == {"attention", "dense_ffn", "router", "experts_dropless", "shared_experts", "lm_head"}
    switch = load_plan(ROOT / "specs/switch-base-8.yaml")
    assert "experts_capacity" in step_flops_by_part(switch) and "shared_experts" not in step_flops_by_part(switch)


def test_recomputation_adds_the_forward_it_repeats():
    plan = with_parallel(load_plan(ROOT / "specs/gshard-top2.yaml"), recompute="none", dp=8, ep=8, global_batch=64)
    backend = load_backend("dgx-h100")
    none, full, selective = (simulate(with_parallel(plan, recompute=mode), backend) for mode in ("none", "full", "selective"))
    # Full replays every block's forward (a third of its FLOPs), not the LM head's.
    head = none["step_flops_by_part"]["lm_head"]
    blocks = none["step_flops_per_rank_microstep"] - head
    assert full["step_flops_by_part"]["recompute"] * 3 == blocks
    # Selective replays only attention's core: 4 * B * H * S^2 * hd per block (36 blocks, 16 heads of 64, S 1024, B 4).
    assert selective["step_flops_by_part"]["recompute"] == 36 * 4 * 4 * 16 * 1024**2 * 64
    assert none["time"]["compute_s"] < selective["time"]["compute_s"] < full["time"]["compute_s"]
    # Full replays the MoE layer too, all-to-alls included: 6 transfers per layer instead of 4.
    ep = with_parallel(plan, dp=8, ep=8)
    assert simulate(with_parallel(ep, recompute="full"), backend)["a2a_bytes_per_rank_microstep"] * 4 == \
        simulate(ep, backend)["a2a_bytes_per_rank_microstep"] * 6


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


def test_what_the_step_time_leaves_out_of_base_is_said_in_both_views(tmp_path):
    # auction_eps and filler rows change the auction's run time, not its counts: the report says
    # the time does not follow them, with the spec's own numbers (sim/model.py base_auction_caveat)
    text = (ROOT / "specs/tiny-base.yaml").read_text()
    spec = tmp_path / "tiny-base-eps.yaml"
    spec.write_text(text.replace("router: {type: base, shuffle: true}", "router: {type: base, shuffle: true, auction_eps: 0.01}")
                    .replace("count: 4, d_ff: 128", "count: 6, d_ff: 128"))  # fmt: skip
    shown = moespec("simulate", str(spec), "--backend", "cpu-local")
    as_json = moespec("simulate", str(spec), "--backend", "cpu-local", "--json")
    assert shown.returncode == 0 and as_json.returncode == 0, shown.stderr + as_json.stderr
    said = json.loads(as_json.stdout)["assumptions"]["base_auction"]
    assert "auction_eps 0.01 is not modelled" in said
    assert "filler rows pad T 512 over E 6 (4 rows)" in said  # micro_batch 8 x seq_len 64 over 6 experts
    assert "note: " + said[:60] in " ".join(shown.stdout.split())
    plain = simulate(load_plan(ROOT / "specs/tiny-base.yaml"), load_backend("cpu-local"))["assumptions"]["base_auction"]
    assert "not modelled" not in plain  # default eps, 512 tokens over 4 experts: nothing left out
    assert "base_auction" not in simulate(load_plan(ROOT / "specs/tiny-ep.yaml"), load_backend("cpu-local"))["assumptions"]
