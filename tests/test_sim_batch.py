"""The vectorised simulator (moespec.sim.batch) equals the scalar one (moespec.sim.model),
design by design: counts exactly, memory and times to 1e-9 relative."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from moespec.sim.backend import load_backend
from moespec.sim.batch import CollectiveCosts, DesignBatch, evaluate
from moespec.sim.model import simulate
from moespec.spec import load_plan
from moespec.spec.plan import CapacityPlan

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
# 1e-9 relative: the batch sums like layers as n * term and fits collectives as affine in
# bytes, where the scalar path adds layer by layer and routes the bytes; both differ from
# exact arithmetic by a few ulps (~1e-15), so 1e-9 leaves room and still catches any formula slip.
RTOL = 1e-9
COUNTS = ("params_total", "params_active", "step_flops", "a2a_bytes")
MEMORY = ("weights", "grads", "optimizer", "activations", "a2a_buffers", "allowance", "total")
TIMES = ("compute_s", "elementwise_s", "overhead_s", "a2a_s", "tp_comm_s", "pp_comm_s", "exposed_allreduce_s", "bubble_s", "optimizer_s", "step_s", "tokens_per_s", "mfu")


def with_parallel(plan, **fields):
    return dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, **fields))


def with_moe(plan, *, experts=None, k=None, capacity_factor=None, dropless=None):
    """Every MoE layer changed alike (a top-k style router: its k field is set)."""
    layers = []
    for layer in plan.layers:
        moe = layer.moe
        if moe is not None:
            if experts is not None:
                moe = dataclasses.replace(moe, experts=dataclasses.replace(moe.experts, count=experts))
            if k is not None:
                moe = dataclasses.replace(moe, router=dataclasses.replace(moe.router, k=k))
            if dropless is not None:
                capacity = moe.capacity or CapacityPlan(1.0, 2.0, 4, "position", False)
                factor = None if dropless else capacity_factor
                moe = dataclasses.replace(moe, capacity=dataclasses.replace(capacity, dropless=dropless, factor=factor))
            layer = dataclasses.replace(layer, moe=moe)
        layers.append(layer)
    return dataclasses.replace(plan, layers=tuple(layers))


def fitted(plan):
    """The plan and a backend it fits: cpu-local (2 ranks) for tiny ones, else a 4 x 8 H100
    cluster with dp cut to 32 (ep to gcd(ep, dp)) where the spec asks for more."""
    if plan.parallel.world <= 2:
        return plan, load_backend("cpu-local")
    p = plan.parallel
    dp = min(p.dp, 32 // (p.tp * p.pp))
    return with_parallel(plan, dp=dp, ep=math.gcd(p.ep, dp)), load_backend("h100-cluster-4n")


def assert_matches(result: dict, i: int, plan, backend, **options) -> None:
    scalar = simulate(plan, backend, **options)
    got = {name: result[name][i] for name in COUNTS}
    want = {"params_total": scalar["params"]["total"], "params_active": scalar["params"]["active"],
            "step_flops": scalar["step_flops_per_rank_microstep"], "a2a_bytes": scalar["a2a_bytes_per_rank_microstep"]}  # fmt: skip
    assert got == want, plan.name
    for part in MEMORY:
        assert result[f"memory_{part}_bytes"][i] == pytest.approx(scalar["memory_per_device"][f"{part}_bytes"], rel=RTOL, abs=0), part
    assert result["fits"][i] == scalar["memory_per_device"]["fits"]
    assert result["valid"][i]
    for name in TIMES:
        assert result[name][i] == pytest.approx(scalar["time"][name], rel=RTOL, abs=0), (plan.name, name)
    assert result["allreduce_s"][i] == pytest.approx(scalar["time"]["dp_allreduce_s"], rel=RTOL, abs=0)


def uniform(plan) -> bool:
    return len({layer.moe for layer in plan.moe_layers}) <= 1


@pytest.mark.parametrize("spec", [path for path in SPECS if uniform(load_plan(path))], ids=lambda path: path.stem)
def test_every_uniform_spec_equals_simulate(spec):
    plan, backend = fitted(load_plan(spec))
    result = evaluate(DesignBatch.from_plans([plan]), backend)
    assert result["step_flops"].dtype == np.int64
    assert_matches(result, 0, plan, backend)
    options = {"overlap": 0.2, "imbalance": 1.5}
    assert_matches(evaluate(DesignBatch.from_plans([plan]), backend, **options), 0, plan, backend, **options)


def test_mixed_moe_layers_are_refused_by_name():
    with pytest.raises(ValueError, match="tiny-mixed: layers .* different MoE configurations"):
        DesignBatch.from_plans([load_plan(ROOT / "specs/tiny-mixed.yaml")])


def random_designs(base, count: int, seed: int):
    """Perturbed plans: E, k, capacity factor (or dropless), ep, dp, tp, pp, micro-batch, ZeRO,
    recompute; always ep | dp and world <= 32."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(count):
        tp, pp = (int(rng.choice([1, 2])) for _ in range(2))
        dp = int(rng.choice([d for d in (1, 2, 4, 8, 16, 32) if d * tp * pp <= 32]))
        experts = int(rng.choice([8, 16, 32, 64, 128]))
        factor = rng.choice([1.0, 1.25, 1.5, 2.0, 0.0])
        plan = with_moe(base, experts=experts, k=int(rng.choice([1, 2, 4, 8])),
                        capacity_factor=float(factor), dropless=bool(factor == 0.0))  # fmt: skip
        plans.append(with_parallel(
            plan, dp=dp, ep=int(rng.choice([e for e in (1, 2, 4, 8, 16, 32) if dp % e == 0])), tp=tp, pp=pp,
            micro_batch=int(rng.choice([1, 2, 4, 8])), global_batch=1024, zero_stage=int(rng.integers(0, 4)),
            recompute=str(rng.choice(["none", "selective", "full"])),
        ))  # fmt: skip
    return plans


@pytest.mark.parametrize("spec,seed", [("olmoe-1b-7b", 0), ("qwen1.5-moe-a2.7b", 1), ("mixtral-8x7b", 2)])
def test_random_perturbations_equal_simulate(spec, seed):
    backend = load_backend("h100-cluster-4n")
    plans = random_designs(load_plan(ROOT / "specs" / f"{spec}.yaml"), 40, seed)
    costs = CollectiveCosts(backend)
    result = evaluate(DesignBatch.from_plans(plans), backend, collectives=costs, imbalance=1.25)
    for i, plan in enumerate(plans):
        assert_matches(result, i, plan, backend, imbalance=1.25)


def test_sweep_equals_packing_the_same_plans():
    base = load_plan(ROOT / "specs/olmoe-1b-7b.yaml")
    plans = random_designs(base, 30, seed=3)
    columns = {
        "experts": [p.moe_layers[0].moe.experts.count for p in plans],
        "k": [p.moe_layers[0].moe.router.k for p in plans],
        "capacity_factor": [p.moe_layers[0].moe.capacity.factor or 0.0 for p in plans],
        "dropless": [p.moe_layers[0].moe.capacity.dropless for p in plans],
        "min_capacity": [p.moe_layers[0].moe.capacity.min_capacity for p in plans],
        **{name: [getattr(p.parallel, name) for p in plans] for name in ("dp", "ep", "tp", "pp", "micro_batch", "zero_stage")},
        "recompute": [("none", "selective", "full").index(p.parallel.recompute) for p in plans],
    }
    swept, packed = DesignBatch.sweep(base, **{name: np.array(v) for name, v in columns.items()}), DesignBatch.from_plans(plans)
    for field in dataclasses.fields(DesignBatch):
        np.testing.assert_array_equal(getattr(swept, field.name), getattr(packed, field.name), err_msg=field.name)
    assert len(swept) == 30 and len(swept.take(slice(5, 9))) == 4


def test_designs_the_backend_cannot_hold_are_marked_not_raised():
    plan = load_plan(ROOT / "specs/olmoe-1b-7b.yaml")  # dp 32 ep 8: 32 ranks
    batch = DesignBatch.sweep(plan, dp=np.array([8, 32, 64, 12]))
    result = evaluate(batch, load_backend("dgx-h100"))
    assert result["valid"].tolist() == [True, False, False, False]  # 12 % 8 != 0: ep must divide dp
    assert np.isfinite(result["step_s"][0]) and np.isnan(result["step_s"][1:]).all()


def test_counts_past_int64_come_back_as_float():
    """A 4M-token context: 12*B*H*S^2*hd attention FLOPs per layer pass 2**63."""
    plan = load_plan(ROOT / "specs/mixtral-8x7b.yaml")
    batch = DesignBatch.sweep(plan, seq_len=np.array([4096, 4 * 2**20]), dp=8, ep=8)
    result = evaluate(batch, load_backend("dgx-h100"))
    assert result["step_flops"].dtype == np.float64 and result["params_total"].dtype == np.int64
    assert result["step_flops"][1] > 2.0**63
    small = with_parallel(plan, dp=8, ep=8)
    assert result["step_flops"][0] == simulate(small, load_backend("dgx-h100"))["step_flops_per_rank_microstep"]


def test_a_dense_model_packs_with_zero_moe_layers():
    plan = load_plan(ROOT / "specs/tiny-topk.yaml")
    dense_layers = tuple(dataclasses.replace(layer, kind="dense", moe=None, d_ff=plan.model.d_ff) for layer in plan.layers)
    dense, backend = dataclasses.replace(plan, layers=dense_layers), load_backend("cpu-local")
    assert_matches(evaluate(DesignBatch.from_plans([dense]), backend), 0, dense, backend)


def test_calibrated_terms_equal_simulate():
    """Host overheads (every kind, per router), the all-to-all wait and the all-reduce scale
    are 0 or 1 on shipped backends; here each is set apart so a slip in either path shows."""
    from types import MappingProxyType

    from moespec.sim.overhead import ROUTER_NAMES, Overheads

    overheads = Overheads(step_s=1e-3, optimizer_step_s=2e-3, dense_layer_s=3e-4,
                          moe_layer_s=MappingProxyType({name: 1e-4 * (i + 1) for i, name in enumerate(ROUTER_NAMES)}),
                          local_expert_s=5e-5, a2a_call_s=7e-5)  # fmt: skip
    backend = dataclasses.replace(load_backend("h100-cluster-4n"), overheads=overheads, allreduce_scale=1.7)
    plans = random_designs(load_plan(ROOT / "specs" / "olmoe-1b-7b.yaml"), 30, 7)
    result = evaluate(DesignBatch.from_plans(plans), backend)
    for i, plan in enumerate(plans):
        assert_matches(result, i, plan, backend)
    assert result["overhead_s"].min() > 0
    tiny = [fitted(load_plan(path))[0] for path in SPECS if path.stem.startswith("tiny") and uniform(load_plan(path))]
    cpu = dataclasses.replace(load_backend("cpu-local"), overheads=overheads, allreduce_scale=1.7)
    result = evaluate(DesignBatch.from_plans(tiny), cpu)
    for i, plan in enumerate(tiny):
        assert_matches(result, i, plan, cpu)
