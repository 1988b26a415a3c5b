"""The cross-field rules (moespec/spec/rules.py): each on scalars with a value that keeps it and
one that breaks it, the same function on arrays equal to the scalars one by one, the new BASE
shuffle rule through resolve.py, and the explorer's verdict equal to the spec layer's, design by
design, naming the same rule."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from moespec.explore import DesignSpace, load_sweep
from moespec.explore.space import FEASIBLE
from moespec.spec import SpecErrors, plan_from_text
from moespec.spec import rules
from moespec.spec.plan import BaseRouter, NoisyTopKRouter, SigmoidBiasRouter, SwitchRouter, TopKRouter

REPO = Path(__file__).resolve().parents[1]

# rule, values that keep it, values that break it, a piece of the message for the broken ones
CASES = [
    (rules.TP_DIVIDES_HEADS, dict(n_heads=8, n_kv_heads=4, tp=4), dict(n_heads=8, n_kv_heads=2, tp=4), "model.n_kv_heads (2)"),
    (rules.TP_DIVIDES_HEADS, dict(n_heads=8, n_kv_heads=8, tp=2), dict(n_heads=6, n_kv_heads=6, tp=4), "tp (4) must divide model.n_heads (6)"),
    (rules.PP_WITHIN_LAYERS, dict(pp=4, n_layers=4), dict(pp=5, n_layers=4), "pp (5) exceeds model.n_layers (4)"),
    (rules.EP_DIVIDES_DP, dict(dp=8, ep=4), dict(dp=6, ep=4), "ep (4) must divide dp (6)"),
    (rules.GLOBAL_BATCH_MULTIPLE, dict(global_batch=32, micro_batch=4, dp=4), dict(global_batch=40, micro_batch=4, dp=4),
     "global_batch (40) must be a multiple of micro_batch * dp (4 * 4 = 16); use 32"),
    (rules.EP_DIVIDES_EXPERTS, dict(experts=8, ep=4), dict(experts=6, ep=4), "experts.count (6) must be divisible by parallelism.ep (4)"),
    (rules.K_WITHIN_EXPERTS, dict(k=4, experts=4), dict(k=5, experts=4), "k (5) exceeds the expert count (4); choose k <= 4"),
    (rules.NOISY_K_BELOW_EXPERTS, dict(k=3, experts=4), dict(k=4, experts=4), "noisy_topk needs k (4) below the expert count (4)"),
    (rules.GROUPS_DIVIDE_EXPERTS, dict(n_groups=4, experts=8), dict(n_groups=3, experts=8), "n_groups (3) must divide the expert count (8)"),
    (rules.TOPK_GROUPS_WITHIN_GROUPS, dict(topk_groups=4, n_groups=4), dict(topk_groups=5, n_groups=4), "topk_groups (5) exceeds n_groups (4)"),
    (rules.K_WITHIN_KEPT_GROUPS, dict(k=4, topk_groups=2, experts=8, n_groups=4), dict(k=5, topk_groups=2, experts=8, n_groups=4),
     "k (5) exceeds the experts in the kept groups (2 x 2)"),
    (rules.BASE_SHUFFLE_DIVIDES, dict(micro_batch=3, seq_len=64, ep=4), dict(micro_batch=3, seq_len=63, ep=2),
     "parallelism.micro_batch * model.seq_len (3 * 63 = 189) must be divisible by parallelism.ep (2)"),
]  # fmt: skip


@pytest.mark.parametrize("rule, valid, invalid, message", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_on_scalars(rule, valid, invalid, message):
    assert set(valid) == set(invalid) == set(rule.inputs)
    assert rule.check(valid) == False  # noqa: E712  (a plain bool: `is False` would pass a numpy bool too)
    assert rule.check(invalid) == True  # noqa: E712
    assert type(rule.check(valid)) is bool and type(rule.check(invalid)) is bool  # scalars give Python bools
    assert message in rule.explain(invalid)
    assert rule.short and rule.path[0] in ("model", "moe", "parallelism")


def test_each_rule_on_arrays_equals_the_scalars():
    """The explorer's view: the same function on columns gives, element by element, the verdict
    of each design's scalars."""
    for rule, valid, invalid, _ in CASES:
        columns = {name: np.array([valid[name], invalid[name], valid[name]], dtype=np.int64) for name in rule.inputs}
        assert rule.check(columns).tolist() == [False, True, False], rule.name


def test_rules_apply_to_the_routers_they_name():
    topk, noisy, switch = TopKRouter(k=2), NoisyTopKRouter(k=2), SwitchRouter()
    sigmoid, base, unshuffled = SigmoidBiasRouter(), BaseRouter(shuffle=True), BaseRouter(shuffle=False)
    assert [r.type for r in (topk, sigmoid) if rules.K_WITHIN_EXPERTS.applies(r)] == ["topk", "sigmoid_bias"]
    assert not rules.K_WITHIN_EXPERTS.applies(noisy) and rules.NOISY_K_BELOW_EXPERTS.applies(noisy)
    assert all(rules.EP_DIVIDES_EXPERTS.applies(r) for r in (topk, noisy, switch, sigmoid, base))
    assert all(rule.applies(sigmoid) and not rule.applies(topk) for rule in rules.GROUP_RULES)
    assert rules.BASE_SHUFFLE_DIVIDES.applies(base) and not rules.BASE_SHUFFLE_DIVIDES.applies(unshuffled)
    assert not rules.BASE_SHUFFLE_DIVIDES.applies(switch)
    assert all(rule.applies is None for rule in rules.PARALLEL_RULES)
    assert all(rule.applies is not None for rule in rules.MOE_RULES)


def test_rules_module_loads_neither_numpy_nor_torch():
    code = "import sys, moespec.spec.rules; print('numpy' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


# --- the new rule through resolve.py -----------------------------------------------------------


def base_spec(*, micro_batch: int, seq_len: int, ep: int, shuffle: bool = True) -> str:
    data = yaml.safe_load((REPO / "specs" / "tiny-base.yaml").read_text())
    data["model"]["seq_len"] = seq_len
    data["moe"]["router"]["shuffle"] = shuffle
    data["parallelism"] = {"dp": 2, "ep": ep, "micro_batch": micro_batch}
    return yaml.safe_dump(data, sort_keys=False)


def test_base_shuffle_needs_tokens_divisible_by_ep():
    with pytest.raises(SpecErrors) as caught:
        plan_from_text(base_spec(micro_batch=3, seq_len=63, ep=2), "base.yaml")
    [error] = caught.value.errors
    assert error.path == "parallelism.micro_batch"
    assert "parallelism.micro_batch * model.seq_len (3 * 63 = 189)" in error.message and "parallelism.ep (2)" in error.message
    assert error.format().startswith("base.yaml:") and error.format().count("\n") == 0
    # Each way out the message offers: an even T, one rank, or no shuffle.
    assert plan_from_text(base_spec(micro_batch=4, seq_len=63, ep=2)).parallel.ep == 2
    assert plan_from_text(base_spec(micro_batch=3, seq_len=63, ep=1)).parallel.ep == 1
    assert plan_from_text(base_spec(micro_batch=3, seq_len=63, ep=2, shuffle=False)).layers[2].moe.router.shuffle is False


# --- the explorer's masks against the spec layer, design by design ------------------------------


ROUTERS = ("[{type: topk, k: 2}, {type: noisy_topk, k: 2}, {type: sigmoid_bias, k: 2, n_groups: 2, topk_groups: 1},"
           " {type: base}, {type: base, shuffle: false}, {type: switch}]")  # fmt: skip
AXES = (
    f"  moe.router: {ROUTERS}\n"
    "  moe.experts.count: [3, 4]\n"
    "  moe.router.k: [1, 2, 4]\n"
    "  parallelism.ep: [1, 2]\n"
    "  parallelism.tp: [1, 2]\n"
    "  parallelism.micro_batch: [3, 4]\n"
    "  model.seq_len: [63, 64]\n"
    "  parallelism.global_batch: [24, 16]\n"
    "  parallelism.sequence_parallel: [false, true]\n"
)


def test_explorer_verdicts_equal_the_spec_layer_design_by_design(tmp_path):
    """Every design the explorer refuses for a spec rule is refused by resolve.py with that
    rule's message; every design it accepts resolves. Each rule a sweep can break is hit."""
    shutil.copy(REPO / "specs" / "tiny-topk.yaml", tmp_path / "base.yaml")
    (tmp_path / "sweep.yaml").write_text(
        f"version: 1\nname: t\nbase: base.yaml\nbackend: cpu-local\naxes:\n{AXES}objectives:\n  tokens_per_s: max\n"
    )
    space = DesignSpace(load_sweep(tmp_path / "sweep.yaml"))
    chunk = space.chunk(np.arange(space.size))
    by_short = {rule.short: rule for rule in rules.RULES}
    hit = {rule.name: 0 for rule in rules.RULES}
    feasible = 0
    for design in range(space.size):
        text = space.reasons[int(chunk.reason[design])]
        if int(chunk.reason[design]) == FEASIBLE:
            space.design_plan(design)  # raises SpecErrors if the spec layer disagrees
            feasible += 1
        elif text in by_short:
            rule = by_short[text]
            s = int(space.structure_of(np.array([design]))[0])
            values = {name: getattr(chunk.batch, name)[design].item() for name in ("n_heads", "n_kv_heads", "tp", "pp", "n_layers", "dp", "ep",
                      "micro_batch", "global_batch", "experts", "k", "seq_len", "sequence_parallel")}  # fmt: skip
            values.update(n_groups=int(space.n_groups[s]), topk_groups=int(space.topk_groups[s]))
            with pytest.raises(SpecErrors) as caught:
                space.design_plan(design)
            assert rule.explain(values) in [e.message for e in caught.value.errors], (design, rule.name)
            hit[rule.name] += 1
    assert feasible >= 50
    broken = {name for name, count in hit.items() if count}
    assert broken >= {"ep_divides_dp", "global_batch_multiple", "ep_divides_experts", "k_within_experts",
                      "noisy_k_below_experts", "groups_divide_experts", "k_within_kept_groups", "base_shuffle_divides",
                      "sp_divides_sequence"}  # fmt: skip


def test_norm_bias_with_rmsnorm_is_refused_at_its_line():
    text = ("version: 1\nname: nb\nmodel:\n  vocab_size: 64\n  d_model: 16\n  n_layers: 2\n  n_heads: 2\n"
            "  norm: rmsnorm\n  norm_bias: false\nmoe: {experts: {count: 4}, router: {type: topk, k: 2}}\n")  # fmt: skip
    with pytest.raises(SpecErrors) as raised:
        plan_from_text(text, "nb.yaml")
    (error,) = raised.value.errors
    assert error.format().startswith("nb.yaml:9:") and "model.norm_bias" in error.format() and "rmsnorm has no bias" in error.format()
    plan = plan_from_text(text.replace("rmsnorm", "layernorm"), "nb.yaml")
    assert plan.model.norm_bias is False and plan_from_text(text.replace("  norm_bias: false\n", ""), "nb.yaml").model.norm_bias is False


@pytest.mark.parametrize("extra,key", [("  head_dim: 24\n", "model.head_dim"), ("  n_kv_heads: 2\n", "model.n_kv_heads"),
                                       ("  qkv_bias: true\n", "model.qkv_bias"), ("  qk_norm: full\n", "model.qk_norm"),
                                       ("  positions: learned\n", "model.positions")])  # fmt: skip
def test_keys_latent_attention_replaces_are_refused_by_name(extra, key):
    text = ("version: 1\nname: mla\nmodel:\n  vocab_size: 64\n  d_model: 32\n  n_layers: 2\n  n_heads: 4\n" + extra +
            "  mla: {kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8}\n"
            "moe: {experts: {count: 4}, router: {type: topk, k: 2}}\n")  # fmt: skip
    with pytest.raises(SpecErrors) as raised:
        plan_from_text(text, "mla.yaml")
    assert any(key in e.format() for e in raised.value.errors), [e.format() for e in raised.value.errors]
    plan = plan_from_text(text.replace(extra, ""), "mla.yaml")
    assert (plan.model.head_dim, plan.model.n_kv_heads) == (12, 4)


def test_gate_input_needs_one_expert_per_token_and_nope_layers_need_rope():
    base = ("version: 1\nname: gi\nmodel: {vocab_size: 64, d_model: 16, n_layers: 2, n_heads: 2, nope_layers: [1]}\n"
            "moe: {experts: {count: 4, gate_input: true}, router: {type: topk, k: 2}}\n")  # fmt: skip
    with pytest.raises(SpecErrors) as raised:
        plan_from_text(base, "gi.yaml")
    assert any("moe.experts.gate_input" in e.format() and "top-1" in e.format() for e in raised.value.errors)
    plan = plan_from_text(base.replace("type: topk, k: 2", "type: switch"), "gi.yaml")
    assert plan.layers[0].moe.experts.gate_input and plan.model.nope_layers == (1,)
    with pytest.raises(SpecErrors) as raised:
        plan_from_text(base.replace("type: topk, k: 2", "type: switch").replace("n_heads: 2,", "n_heads: 2, positions: learned,"), "gi.yaml")
    assert any("model.nope_layers" in e.format() for e in raised.value.errors)
