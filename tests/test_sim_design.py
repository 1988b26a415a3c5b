"""Packing designs into arrays (moespec.sim.design) loses nothing: a design's figures are the
same whether it is evaluated alone or inside any batch, whatever its neighbours' layer mix,
and a swept batch equals packing the plans it describes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from moespec.model.build import build_model
from moespec.model.counting import count_parameters
from moespec.sim.backend import load_backend
from moespec.sim.cost import CollectiveCosts, evaluate
from moespec.sim.design import DesignBatch, require_uniform
from moespec.spec import load_plan
from moespec.spec.plan import CapacityPlan

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


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


def random_designs(base, count: int, seed: int):
    """Perturbed plans: E, k, capacity factor (or dropless), ep, dp, tp, pp, micro-batch, ZeRO,
    recompute; always ep | dp and world <= 32."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(count):
        tp, pp = (int(rng.choice([1, 2])) for _ in range(2))
        dp = int(rng.choice([d for d in (1, 2, 4, 8, 16, 32) if d * tp * pp <= 32]))
        factor = rng.choice([1.0, 1.25, 1.5, 2.0, 0.0])
        plan = with_moe(base, experts=int(rng.choice([8, 16, 32, 64, 128])), k=int(rng.choice([1, 2, 4, 8])),
                        capacity_factor=float(factor), dropless=bool(factor == 0.0))  # fmt: skip
        plans.append(with_parallel(
            plan, dp=dp, ep=int(rng.choice([e for e in (1, 2, 4, 8, 16, 32) if dp % e == 0])), tp=tp, pp=pp,
            micro_batch=int(rng.choice([1, 2, 4, 8])), global_batch=1024, zero_stage=int(rng.integers(0, 4)),
            recompute=str(rng.choice(["none", "selective", "full"])),
        ))  # fmt: skip
    return plans


def fitted(plan):
    """A plan cut to fit the 4 x 8 H100 cluster (dp at most 32 / (tp * pp), ep | dp)."""
    p = plan.parallel
    dp = min(p.dp, 32 // (p.tp * p.pp))
    return with_parallel(plan, dp=dp, ep=math.gcd(p.ep, dp), global_batch=dp * p.micro_batch)


def assert_same(batch_out: dict, i: int, alone: dict, label) -> None:
    for name, values in alone.items():
        got, want = batch_out[name][i], values[0]
        if isinstance(want, (float, np.floating)) and np.isnan(want):
            assert np.isnan(got), (label, name)
        else:
            assert got == want, (label, name, got, want)


def test_a_design_evaluates_the_same_alone_and_in_any_batch():
    """Uniform designs (derived layer groups) and mixed ones (tiny-mixed: switch, top-2, BASE,
    an explicit LayerTable) side by side: the per-design sums must not mix designs up."""
    backend = load_backend("h100-cluster-4n")
    plans = random_designs(load_plan(ROOT / "specs/olmoe-1b-7b.yaml"), 12, seed=0)
    plans += [fitted(plan) for plan in map(load_plan, SPECS) if plan.model.encoder is None]  # a batch is decoder-only or encoder-decoder
    plans.insert(3, with_parallel(load_plan(ROOT / "specs/tiny-mixed.yaml"), recompute="full"))
    costs = CollectiveCosts(backend)
    together = evaluate(DesignBatch.from_plans(plans), backend, collectives=costs, imbalance=1.25)
    assert DesignBatch.from_plans(plans).layers is not None  # the mixed spec forces an explicit table
    for i, plan in enumerate(plans):
        alone = evaluate(DesignBatch.from_plans([plan]), backend, collectives=costs, imbalance=1.25)
        assert_same(together, i, alone, plan.name)
    picked = DesignBatch.from_plans(plans).take(np.array([3, 0]))
    again = evaluate(picked, backend, collectives=costs, imbalance=1.25)
    assert again["params_total"].tolist() == [together["params_total"][3], together["params_total"][0]]
    assert again["step_s"].tolist() == [together["step_s"][3], together["step_s"][0]]


def test_an_encoder_decoder_evaluates_the_same_alone_and_in_a_batch():
    """Encoder-decoders pack their encoder stacks as a second part (design.py): taking designs
    out of a batch takes their encoder parts with them."""
    backend = load_backend("h100-cluster-4n")
    base = load_plan(ROOT / "specs/tiny-t5-switch.yaml")
    plans = [with_parallel(base, dp=dp, ep=ep, micro_batch=mb, global_batch=gb, recompute=rc)
             for dp, ep, mb, gb, rc in [(1, 1, 8, 8, "none"), (2, 2, 4, 16, "full"), (4, 2, 2, 8, "none")]]  # fmt: skip
    plans.append(load_plan(ROOT / "specs/switch-base-8.yaml"))
    costs = CollectiveCosts(backend)
    together = evaluate(DesignBatch.from_plans(plans), backend, collectives=costs)
    for i, plan in enumerate(plans):
        assert_same(together, i, evaluate(DesignBatch.from_plans([plan]), backend, collectives=costs), plan.name)
    picked = evaluate(DesignBatch.from_plans(plans).take(np.array([3, 1])), backend, collectives=costs)
    assert picked["step_s"].tolist() == [together["step_s"][3], together["step_s"][1]]
    with pytest.raises(ValueError, match="not both"):
        DesignBatch.from_plans([base, load_plan(ROOT / "specs/tiny-topk.yaml")])


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
        if field.name not in ("layers", "encoder"):  # decoder-only: no encoder part
            np.testing.assert_array_equal(getattr(swept, field.name), getattr(packed, field.name), err_msg=field.name)
    assert swept.layers is None and packed.layers is None
    assert len(swept) == 30 and len(swept.take(slice(5, 9))) == 4


def test_unlike_layers_cannot_be_swept_by_column():
    mixed = DesignBatch.from_plans([load_plan(ROOT / "specs/tiny-mixed.yaml")])
    with pytest.raises(ValueError, match="unlike layers"):
        mixed.replace(experts=8)
    assert len(mixed.replace(dp=2)) == 1  # parallel fields are per design: fine
    with pytest.raises(ValueError, match="tiny-mixed: layers .* different MoE configurations"):
        require_uniform(load_plan(ROOT / "specs/tiny-mixed.yaml"))


def test_designs_the_backend_cannot_hold_are_marked_not_raised():
    plan = load_plan(ROOT / "specs/olmoe-1b-7b.yaml")  # dp 32 ep 8: 32 ranks
    batch = DesignBatch.sweep(plan, dp=np.array([8, 32, 64, 12]))
    result = evaluate(batch, load_backend("dgx-h100"))
    assert result["valid"].tolist() == [True, False, False, False]  # 12 % 8 != 0: ep must divide dp
    assert np.isfinite(result["step_s"][0]) and np.isnan(result["step_s"][1:]).all()


def test_counts_past_int64_come_back_as_float():
    """A 4M-token context: 12*B*H*S^2*hd attention FLOPs per layer pass 2**63; the batch's
    other design keeps its exact integer count (the one it has alone)."""
    plan = load_plan(ROOT / "specs/mixtral-8x7b.yaml")
    batch = DesignBatch.sweep(plan, seq_len=np.array([4096, 4 * 2**20]), dp=8, ep=8)
    result = evaluate(batch, load_backend("dgx-h100"))
    assert result["step_flops"].dtype == np.float64 and result["params_total"].dtype == np.int64
    assert result["step_flops"][1] > 2.0**63
    alone = evaluate(batch.take(np.array([0])), load_backend("dgx-h100"))
    assert alone["step_flops"].dtype == np.int64 and result["step_flops"][0] == float(alone["step_flops"][0])


def test_a_dense_model_packs_with_zero_moe_layers():
    plan = load_plan(ROOT / "specs/tiny-topk.yaml")
    dense_layers = tuple(dataclasses.replace(layer, kind="dense", moe=None, d_ff=plan.model.d_ff) for layer in plan.layers)
    dense = dataclasses.replace(plan, layers=dense_layers)
    result = evaluate(DesignBatch.from_plans([dense]), load_backend("cpu-local"))
    built = count_parameters(build_model(dense, device="meta"), dense)
    assert (result["params_total"][0], result["params_active"][0]) == (built.total, built.total)
    assert result["a2a_bytes"][0] == 0 and result["flops_experts_capacity"][0] == result["flops_router"][0] == 0
