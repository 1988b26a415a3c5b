"""The agreement matrix: the cost model and the runtime agree exactly, on real gloo ranks.

For precision {fp32, bf16} x ZeRO {0, 1, 2, 3} x recompute {none, selective, full} x
(dp, ep) in {(2, 1), (2, 2), (4, 2)} x routing {capacity, dropless, BASE with shuffle}, pruned
to a covering set that runs in a few minutes on 2 cores: every (dp, ep, routing) cell runs all
four ZeRO stages, each ZeRO stage meets every recompute mode and both precisions across the
cells, and some cells accumulate 2 micro-batches or hold fewer experts per rank than replicas
(the expert bank then shards by its second dim). One optimizer step of the training path
(moespec/distributed/agreement.py) is compared with `simulate` of the same plan, exactly:
- matmul FLOPs per micro-step (FlopCounterMode, recomputed forwards included);
- all-to-all bytes per rank per micro-step, dispatch/combine and BASE's shuffle apart (dropless
  top-k excepted: its bytes follow the routing, the prediction assumes balance);
- bytes of parameters, gradients and optimizer state on the rank that holds the most;
- all-to-all calls per step, and the ZeRO collectives (all-gather, reduce-scatter) per step.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from moespec.distributed.agreement import agreement_worker
from moespec.distributed.parity import plan_fields, plan_from_fields
from moespec.sim.backend import load_backend
from moespec.sim.model import simulate
from moespec.spec import load_plan
from moespec.spec.plan import BaseRouter, CapacityPlan, TopKRouter

ROOT = Path(__file__).resolve().parents[1]
CAPACITY = CapacityPlan(factor=1.25, eval_factor=2.0, min_capacity=4, drop_policy="position", dropless=False)
DROPLESS = CapacityPlan(factor=None, eval_factor=None, min_capacity=4, drop_policy="position", dropless=True)
ROUTING = {"capacity": (TopKRouter(k=2), CAPACITY), "dropless": (TopKRouter(k=2), DROPLESS), "base": (BaseRouter(shuffle=True), None)}
RECOMPUTE = ("none", "selective", "full")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def variant(*, dp, ep, routing, precision, zero_stage, recompute, accum=1, experts=4):
    """tiny-topk (4 blocks, 2 MoE, D 64) with T = 2 * 32 tokens per routing group."""
    plan = load_plan(ROOT / "specs/tiny-topk.yaml")
    router, capacity = ROUTING[routing]
    layers = []
    for layer in plan.layers:
        if layer.moe is not None:
            moe = dataclasses.replace(layer.moe, router=router, capacity=capacity,
                                      experts=dataclasses.replace(layer.moe.experts, count=experts))  # fmt: skip
            layer = dataclasses.replace(layer, moe=moe)
        layers.append(layer)
    parallel = dataclasses.replace(plan.parallel, dp=dp, ep=ep, micro_batch=2, global_batch=2 * dp * accum,
                                   precision=precision, zero_stage=zero_stage, recompute=recompute)  # fmt: skip
    name = f"dp{dp}ep{ep}-{routing}-{precision}-zero{zero_stage}-{recompute}" + (f"-accum{accum}" if accum > 1 else "") + (
        f"-e{experts}" if experts != 4 else "")
    return dataclasses.replace(plan, name=name, layers=tuple(layers), model=dataclasses.replace(plan.model, seq_len=32),
                               parallel=parallel)  # fmt: skip


def matrix(world: int) -> list:
    """The covering set for one world size (see the module docstring)."""
    cells = [(2, 1), (2, 2)] if world == 2 else [(4, 2)]
    plans = []
    for c, (dp, ep) in enumerate(cells):
        for r, routing in enumerate(ROUTING):
            for zero in range(4):
                turn = 3 * c + r + zero
                plans.append(variant(dp=dp, ep=ep, routing=routing, zero_stage=zero, recompute=RECOMPUTE[turn % 3],
                                     precision=("fp32", "bf16")[turn % 2], accum=2 if (turn % 5 == 0) else 1,
                                     experts=2 if (world == 4 and zero in (1, 3)) else 4))  # fmt: skip
    return plans


def run(world: int, plans: list, tmp_path: Path) -> list[list[dict]]:
    cases = [(plan.name, plan_fields(plan)) for plan in plans]
    mp.spawn(agreement_worker, args=(world, free_port(), cases, str(tmp_path)), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", [2, 4])
def test_runtime_holds_computes_and_sends_what_the_cost_model_predicts(world, tmp_path):
    plans = matrix(world)
    results = run(world, plans, tmp_path)
    backend = load_backend("cpu-local") if world <= 2 else load_backend("h100-cluster-4n")
    checked = 0
    for i, plan in enumerate(plans):
        ranks = [rank_results[i] for rank_results in results]
        assert all(r["case"] == plan.name for r in ranks)
        predicted = simulate(plan_from_fields(plan_fields(plan)), backend)
        label = plan.name
        dropless_ep = "dropless" in label and plan.parallel.ep > 1
        if dropless_ep:  # a rank computes the rows routed to its experts: their mean is the prediction
            assert sum(r["flops_per_microstep"] for r in ranks) == world * predicted["step_flops_per_rank_microstep"], label
        for r in ranks:
            if not dropless_ep:
                assert r["flops_per_microstep"] == predicted["step_flops_per_rank_microstep"], (label, r["rank"])
                assert r["a2a_bytes_per_microstep"] == predicted["a2a_bytes_per_rank_microstep"], (label, r["rank"])
            assert r["shuffle_bytes_per_microstep"] == predicted["shuffle_a2a_bytes_per_rank_microstep"], (label, r["rank"])
            calls = {kind: r["calls"].get(kind, 0) for kind in ("all_to_all", "all_gather", "reduce_scatter")}
            assert calls == predicted["collective_calls_per_step"], (label, r["rank"], r["calls"])
        held = {kind: max(r["state_bytes"][kind] for r in ranks) for kind in ("params", "grads", "optimizer")}
        assert held == predicted["state_bytes_per_rank"], (label, held, predicted["state_bytes_per_rank"])
        checked += 1
    assert checked == len(plans) == (24 if world == 2 else 12)


def _held_by_rank0(model, plan) -> dict[str, int]:
    """Bytes rank 0 of the plan's world holds, by the runtime's own placement (zero.py's
    chunk_range and expert_shard_dim, FSDP2's Shard(d)), on the model's real shapes."""
    from moespec.distributed.data_parallel import expert_parameter_names
    from moespec.distributed.zero import chunk_range, expert_shard_dim

    p = plan.parallel
    experts = set(expert_parameter_names(model))
    local = plan.moe_layers[0].moe.experts.count // p.ep
    whole = sharded = 0
    for name, param in model.named_parameters():
        shape = list(param.shape)
        if name in experts:
            shape[0] = local  # ep: this rank's E/ep experts of the bank
            dim, ranks = expert_shard_dim(local, p.expert_dp), p.expert_dp
        else:
            dim, ranks = 0, p.dp
        numel = 1
        for size in shape:
            numel *= size
        start, stop = chunk_range(shape[dim], 0, ranks)
        whole += numel
        sharded += numel // shape[dim] * (stop - start)
    zero = p.zero_stage
    return {"params": 4 * (sharded if zero >= 2 else whole), "grads": 4 * (sharded if zero >= 2 else whole),
            "optimizer": 8 * (sharded if zero >= 1 else whole)}  # fmt: skip


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_mixtral_on_32_gpus_holds_what_simulate_reports(zero_stage):
    """`moespec simulate specs/mixtral-8x7b.yaml --backend h100-cluster-4n --world 32` (dp 32,
    ep 8: one expert per rank, 4 replicas, so expert banks shard by their second dim): the
    memory rows equal what the runtime's sharding puts on rank 0 of the real shapes (meta)."""
    from moespec.model.build import build_model

    plan = load_plan(ROOT / "specs/mixtral-8x7b.yaml")
    plan = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, dp=32, ep=8, global_batch=32 * plan.parallel.micro_batch,
                                                                  zero_stage=zero_stage))  # fmt: skip
    report = simulate(plan, load_backend("h100-cluster-4n"))
    held = _held_by_rank0(build_model(plan, device="meta"), plan)
    assert report["state_bytes_per_rank"] == held
    memory = report["memory_per_device"]
    assert (memory["weights_bytes"], memory["grads_bytes"], memory["optimizer_bytes"]) == (held["params"], held["grads"], held["optimizer"])
