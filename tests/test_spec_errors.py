"""Bad specs and the exact error each one gets: line, column, YAML path, what is wrong and the fix.

Every case starts from BASE (below, with its line numbers) and changes one thing, so a reader
can check each expected position by eye. A case passes only if the spec fails with exactly
that one error (unless it says otherwise), formatted on one line as
`spec.yaml:LINE:COL: PATH: message`.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from moespec.spec import SpecErrors, load_plan, plan_from_text
from moespec.spec.yaml_source import MAX_FILE_BYTES

REPO = Path(__file__).resolve().parents[1]

# fmt: off
BASE = (
    "version: 1\n"                      # 1
    "name: tiny\n"                      # 2
    "model:\n"                          # 3
    "  vocab_size: 256\n"               # 4
    "  d_model: 64\n"                   # 5
    "  n_layers: 4\n"                   # 6
    "  n_heads: 4\n"                    # 7
    "  d_ff: 128\n"                     # 8
    "moe:\n"                            # 9
    "  placement: {type: all}\n"        # 10
    "  experts: {count: 4}\n"           # 11
    "  router: {type: topk, k: 2}\n"    # 12
    "  capacity: {factor: 1.25}\n"      # 13
    "parallelism:\n"                    # 14
    "  dp: 2\n"                         # 15
    "  ep: 2\n"                         # 16
    "  micro_batch: 2\n"                # 17
)
# fmt: on
MODEL_END = "  d_ff: 128\n"  # line 8: append model keys after it (they land on line 9)
MOE_END = "  capacity: {factor: 1.25}\n"  # line 13: append moe keys after it (line 14 on)
PAR_END = "  micro_batch: 2\n"  # line 17: append parallelism keys after it (line 18)
BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)  # billion laughs: 9 levels of 9 aliases, 9**9 leaves if expanded


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once in the spec it edits"
    return text.replace(old, new)


def overrides(block: str) -> str:
    """BASE with `block` (an `overrides:` list, indented under moe) after the capacity line."""
    return edit(MOE_END, MOE_END + "  overrides:\n" + block)


@dataclass(frozen=True)
class Bad:
    id: str
    text: str
    line: int
    col: int
    path: str
    says: tuple[str, ...]  # substrings of the message: what is wrong, and the fix


def bad(id: str, text: str, line: int, col: int, path: str, *says: str) -> Bad:
    return Bad(id, text, line, col, path, says)


# fmt: off  (one case per line, so the table reads as a table)
CASES = [
    # --- YAML syntax and document shape ------------------------------------------------
    bad("indent-deeper", edit("  n_layers: 4\n", "    n_layers: 4\n"), 6, 13, "(root)", "invalid YAML", "mapping values are not allowed", "fix the syntax"),
    bad("indent-shallower", "version: 1\nname: x\nmodel:\n    d_model: 4\n  n_layers: 2\n", 5, 3, "(root)", "invalid YAML", "expected <block end>", "block mapping on line 1", "fix the syntax"),
    bad("unclosed-brace", edit("{count: 4}", "{count: 4"), 12, 9, "(root)", "invalid YAML", "expected ',' or '}'", "flow mapping on line 11", "fix the syntax"),
    bad("unclosed-bracket", "version: 1\nname: [tiny\nmodel: {}\n", 3, 6, "(root)", "invalid YAML", "expected ',' or ']'", "flow sequence on line 2", "fix the syntax"),
    bad("tab-indent", edit("  n_heads: 4\n", "\tn_heads: 4\n"), 7, 1, "(root)", "invalid YAML", "'\\t'", "indent with spaces, not tabs"),
    bad("duplicate-anchor", edit("name: tiny", "name: &n tiny").replace("d_model: 64", "d_model: &n 64"), 5, 12, "(root)", "found duplicate anchor 'n'; first occurrence on line 2", "second occurrence"),
    bad("unclosed-quote", edit("name: tiny", 'name: "tiny'), 18, 1, "(root)", "found unexpected end of stream", "quoted scalar on line 2"),
    bad("nul-character", edit("name: tiny", "name: ti\x00ny"), 2, 9, "(root)", "#x0000 is not allowed", "remove it"),
    bad("empty-file", "", 1, 1, "(root)", "the file is empty", "needs at least version, name and model"),
    bad("only-comments", "# a spec\n\n", 1, 1, "(root)", "the file is empty"),
    bad("document-is-list", "- version: 1\n- name: tiny\n", 1, 1, "(root)", "a spec is a mapping", "version:, name:, model:"),
    bad("document-is-scalar", "tiny\n", 1, 1, "(root)", "a spec is a mapping"),
    bad("two-documents", BASE + "---\nversion: 1\n", 18, 1, "(root)", "invalid YAML", "another document", "a spec is one YAML document", "remove this '---'"),
    bad("duplicate-key", edit("  n_heads: 4\n", "  n_heads: 4\n  n_heads: 8\n"), 8, 3, "model.n_heads", "duplicate key 'n_heads' (first set on line 7)", "keep one of them"),
    bad("int-key", edit(MODEL_END, MODEL_END + "  1: x\n"), 9, 3, "model", "key '1' is read as an integer, not a string", "quote it"),
    bad("bool-key", edit(MODEL_END, MODEL_END + "  true: x\n"), 9, 3, "model", "key 'true' is read as a boolean, not a string", "quote it"),
    bad("null-key", edit(MODEL_END, MODEL_END + "  ~: x\n"), 9, 3, "model", "key 'null' is read as null", "quote it"),
    bad("list-key", edit(MODEL_END, MODEL_END + "  ? [a, b]\n  : 1\n"), 9, 5, "model", "a mapping key must be a plain string", "write key: value"),
    bad("unknown-tag", edit("version: 1", "version: !python/object 1"), 1, 10, "version", "could not determine a constructor", "use a plain string, number or boolean"),
    bad("bad-bool-tag", edit("dp: 2", "dp: !!bool maybe"), 15, 7, "parallelism.dp", "'maybe' cannot be read as bool", "remove the !!bool tag"),
    bad("empty-int-tag", edit("dp: 2", "dp: !!int ''"), 15, 7, "parallelism.dp", "'' cannot be read as int", "remove the !!int tag"),
    bad("bad-timestamp-tag", edit("name: tiny", "name: !!timestamp soon"), 2, 7, "name", "'soon' cannot be read as timestamp"),
    # --- wrong types -------------------------------------------------------------------
    bad("string-for-int", edit("d_model: 64", "d_model: sixty-four"), 5, 12, "model.d_model", "expected a whole number, got str 'sixty-four'", "write a whole number here"),
    bad("list-for-mapping", edit("{count: 4}", "[4]"), 11, 12, "moe.experts", "expected a mapping (key: value lines), got a list", "write a mapping"),
    bad("bool-for-int", edit("n_layers: 4", "n_layers: true"), 6, 13, "model.n_layers", "expected a whole number, got boolean true", "write a whole number"),
    bad("float-for-int", edit("n_layers: 4", "n_layers: 2.5"), 6, 13, "model.n_layers", "got float 2.5", "write a whole number"),
    bad("int-for-string", edit("name: tiny", "name: 12"), 2, 7, "name", "expected a string, got int 12", "write a string"),
    bad("null-router", edit("{type: topk, k: 2}", ""), 12, 10, "moe.router", "expected a mapping (key: value lines), got null"),
    bad("null-model", "version: 1\nname: tiny\nmodel:\n", 3, 7, "model", "expected a mapping", "got null"),
    # --- numbers out of range ----------------------------------------------------------
    bad("zero-layers", edit("n_layers: 4", "n_layers: 0"), 6, 13, "model.n_layers", "must be >= 1, got 0", "choose a value >= 1"),
    bad("negative-width", edit("d_model: 64", "d_model: -64"), 5, 12, "model.d_model", "must be >= 1, got -64", "choose a value >= 1"),
    bad("huge-int", edit("d_model: 64", f"d_model: {10**30}"), 5, 12, "model.d_model", f"must be <= 1048576, got {10**30}", "choose a value <= 1048576"),
    bad("5000-digit-int", edit("d_model: 64", "d_model: " + "7" * 5000), 5, 12, "model.d_model", "an integer with 5000 digits", "use a smaller value"),
    bad("101-digit-int", edit("dp: 2", "dp: 1" + "0" * 100), 15, 7, "parallelism.dp", "an integer with 101 digits is far too large"),
    bad("float-overflow", edit("factor: 1.25", "factor: 1.0e400"), 13, 22, "moe.capacity.factor", "inf is not a finite number", "write a finite value"),
    bad("nan", edit("factor: 1.25", "factor: .nan"), 13, 22, "moe.capacity.factor", "nan is not a finite number", "write a finite value"),
    bad("zero-factor", edit("factor: 1.25", "factor: 0"), 13, 22, "moe.capacity.factor", "must be > 0, got 0", "choose a value > 0"),
    # --- unknown keys and bad enum values (with did-you-mean) ----------------------------
    bad("unknown-top-level", edit("parallelism:", "paralelism:"), 14, 1, "paralelism", "unknown key 'paralelism'", "did you mean 'parallelism'?"),
    bad("unknown-in-model", edit(MODEL_END, MODEL_END + "  n_head: 4\n"), 9, 3, "model.n_head", "unknown key 'n_head'", "did you mean 'n_heads'?"),
    bad("unknown-in-router", edit("k: 2}", "k: 2, normalise: true}"), 12, 30, "moe.router.normalise", "unknown key 'normalise'", "did you mean 'normalize'?"),
    bad("unknown-in-capacity", edit("{factor: 1.25}", "{factor: 1.25, min_capacty: 2}"), 13, 28, "moe.capacity.min_capacty", "unknown key 'min_capacty'", "did you mean 'min_capacity'?"),
    bad("section-name-repeated", edit("{factor: 1.25}", "{capacity_factor: 1.25}"), 13, 14, "moe.capacity.capacity_factor", "unknown key 'capacity_factor'", "did you mean 'factor'?"),
    bad("unknown-key-with-space", edit(MODEL_END, MODEL_END + '  "n layers": 4\n'), 9, 3, "model['n layers']", "unknown key 'n layers'", "did you mean 'n_layers'?"),
    bad("unknown-key-with-newline", edit(MODEL_END, MODEL_END + '  "seq\\nlen": 4\n'), 9, 3, "model['seq\\nlen']", "unknown key 'seq\\nlen'", "did you mean 'seq_len'?"),
    bad("unknown-key-list-type", BASE + "type: []\n", 18, 1, "type", "unknown key 'type'", "allowed here: $schema, description"),
    bad("unknown-no-suggestion", edit("{count: 4}", "{num_experts: 4}"), 11, 13, "moe.experts.num_experts", "unknown key 'num_experts'", "allowed here: bias, count, d_ff"),
    bad("unknown-in-override", overrides("    - layers: [1]\n      expert: {count: 2}\n"), 16, 7, "moe.overrides[0].expert", "unknown key 'expert'", "did you mean 'experts'?"),
    bad("bad-activation", edit(MODEL_END, MODEL_END + "  activation: swiglo\n"), 9, 15, "model.activation", "str 'swiglo' is not one of relu, gelu, swiglu, geglu", "did you mean 'swiglu'?"),
    bad("bad-norm", edit(MODEL_END, MODEL_END + "  norm: rms_norm\n"), 9, 9, "model.norm", "'rms_norm' is not one of layernorm, rmsnorm", "did you mean 'rmsnorm'?"),
    bad("bad-router-type", edit("type: topk", "type: top_k"), 12, 18, "moe.router.type", "'top_k' is not one of topk, noisy_topk", "did you mean 'topk'?"),
    bad("bad-drop-policy", edit("{factor: 1.25}", "{factor: 1.25, drop_policy: positon}"), 13, 41, "moe.capacity.drop_policy", "'positon' is not one of position, probability", "did you mean 'position'?"),
    bad("bad-placement-type", edit("type: all", "type: evry"), 10, 21, "moe.placement.type", "'evry' is not one of all, every, layers, middle", "did you mean 'every'?"),
    bad("enum-no-suggestion", edit(PAR_END, PAR_END + "  precision: int4\n"), 18, 14, "parallelism.precision", "'int4' is not one of fp32, bf16, fp16", "pick one of those"),
    bad("version-2", edit("version: 1", "version: 2"), 1, 10, "version", "must be 1, got int 2", "set it to 1"),
    bad("name-with-space", edit("name: tiny", "name: my model"), 2, 7, "name", "'my model' does not match", "use letters, digits"),
    bad("name-trailing-newline", edit("name: tiny", 'name: "tiny\\n"'), 2, 7, "name", "'tiny\\n' does not match"),
    bad("missing-model", "version: 1\nname: tiny\n", 1, 1, "(root)", "missing required key 'model'", "add it"),
    bad("missing-d_model", edit("  d_model: 64\n", ""), 3, 1, "model", "missing required key 'd_model' in 'model'", "add it"),
    bad("missing-router-type", edit("{type: topk, k: 2}", "{k: 2}"), 12, 3, "moe.router", "missing required key 'type'", "add it"),
    # --- semantic rules (resolve.py) ----------------------------------------------------
    bad("kv-heads-not-dividing", edit(MODEL_END, MODEL_END + "  n_kv_heads: 3\n"), 9, 3, "model.n_kv_heads", "n_kv_heads (3) must divide n_heads (4)", "pick a divisor of 4"),
    bad("heads-not-dividing-width", edit("n_heads: 4", "n_heads: 5"), 7, 3, "model.n_heads", "n_heads (5) does not divide d_model (64)", "set model.head_dim"),
    bad("odd-head-dim-rope", edit("d_model: 64", "d_model: 12"), 7, 3, "model.n_heads", "head_dim (3) must be even", "use positions: learned"),
    bad("odd-explicit-head-dim", edit(MODEL_END, MODEL_END + "  head_dim: 7\n"), 9, 3, "model.head_dim", "head_dim (7) must be even", "change head_dim"),
    bad("ep-not-dividing-dp", edit("ep: 2", "ep: 4"), 16, 3, "parallelism.ep", "ep (4) must divide dp (2)", "set ep to a divisor of dp"),
    bad("experts-not-divisible-by-ep", edit("count: 4", "count: 3"), 11, 13, "moe.experts.count", "experts.count (3) must be divisible by parallelism.ep (2)", "same number of experts"),
    bad("override-experts-not-divisible", overrides("    - layers: [1]\n      experts: {count: 3}\n"), 16, 17, "moe.overrides[0].experts.count", "experts.count (3) must be divisible by parallelism.ep (2)"),
    bad("tp-not-dividing-heads", edit(PAR_END, PAR_END + "  tp: 3\n"), 18, 3, "parallelism.tp", "tp (3) must divide model.n_heads (4)", "pick a divisor"),
    bad("tp-not-dividing-kv-heads", edit(PAR_END, PAR_END + "  tp: 4\n").replace(MODEL_END, MODEL_END + "  n_kv_heads: 2\n"), 19, 3, "parallelism.tp", "tp (4) must divide model.n_kv_heads (2)"),
    bad("pp-over-layers", edit(PAR_END, PAR_END + "  pp: 5\n"), 18, 3, "parallelism.pp", "pp (5) exceeds model.n_layers (4)", "at least one layer"),
    bad("global-batch-not-multiple", edit(PAR_END, PAR_END + "  global_batch: 6\n"), 18, 3, "parallelism.global_batch", "global_batch (6) must be a multiple of micro_batch * dp (2 * 2 = 4)", "use 4"),
    bad("first-dense-too-large", edit("{type: all}", "{type: all, first_dense: 4}"), 10, 26, "moe.placement.first_dense", "first_dense (4) leaves no MoE layer in 4 layers", "use a value below 4"),
    bad("every-offset-past-end", edit("{type: all}", "{type: every, every: 2, offset: 4}"), 10, 38, "moe.placement.offset", "offset (4) is past the last layer (3)", "use an offset below 4"),
    bad("placement-layer-out-of-range", edit("{type: all}", "{type: layers, layers: [1, 4]}"), 10, 41, "moe.placement.layers[1]", "layer 4 is out of range for n_layers 4", "use 0..3"),
    bad("placement-makes-no-moe", edit("{type: all}", "{type: every, every: 8, offset: 3, first_dense: 4}").replace("n_layers: 4", "n_layers: 6"), 10, 3, "moe.placement", "makes no layer MoE in 6 layers", "remove the moe section"),
    bad("override-layer-out-of-range", overrides("    - layers: [9]\n      experts: {count: 2}\n"), 15, 16, "moe.overrides[0].layers[0]", "layer 9 is out of range for n_layers 4", "use 0..3"),
    bad("override-dense-layer", overrides("    - layers: [0]\n      experts: {count: 2}\n").replace("{type: all}", "{type: layers, layers: [1, 2]}"), 15, 16, "moe.overrides[0].layers[0]", "layer 0 is dense under moe.placement (MoE layers: 1, 2)", "add it to the placement or drop it here"),
    bad("override-twice", overrides("    - layers: [1]\n      experts: {count: 2}\n    - layers: [2, 1]\n      router: {type: switch}\n"), 17, 19, "moe.overrides[1].layers[1]", "layer 1 is already overridden by moe.overrides[0]", "merge the two overrides"),
    bad("override-empty", overrides("    - layers: [1]\n"), 15, 7, "moe.overrides[0]", "this override changes nothing", "add router, experts or capacity"),
    bad("override-no-layers", overrides("    - router: {type: switch}\n"), 15, 7, "moe.overrides[0]", "missing required key 'layers'", "add it"),
    bad("topk-k-over-experts", edit("k: 2", "k: 5"), 12, 24, "moe.router.k", "k (5) exceeds the expert count (4)", "choose k <= 4"),
    bad("noisy-topk-k-equals-experts", edit("type: topk, k: 2", "type: noisy_topk, k: 4"), 12, 30, "moe.router.k", "noisy_topk needs k (4) below the expert count (4)", "lower k"),
    bad("sigmoid-groups-not-dividing", edit("type: topk, k: 2", "type: sigmoid_bias, k: 2, n_groups: 3"), 12, 38, "moe.router.n_groups", "n_groups (3) must divide the expert count (4)", "pick a divisor of 4"),
    bad("sigmoid-topk-groups-over-groups", edit("type: topk, k: 2", "type: sigmoid_bias, k: 2, n_groups: 2, topk_groups: 3"), 12, 51, "moe.router.topk_groups", "topk_groups (3) exceeds n_groups (2)", "choose at most 2"),
    bad("sigmoid-k-over-kept-groups", edit("type: topk, k: 2", "type: sigmoid_bias, k: 3, n_groups: 4, topk_groups: 2"), 12, 32, "moe.router.k", "k (3) exceeds the experts in the kept groups (2 x 1)", "raise topk_groups or lower k"),
    bad("base-with-k", edit("type: topk, k: 2", "type: base, k: 1"), 12, 24, "moe.router.k", "base routes each token to exactly one expert, so it takes no k", "remove k"),
    bad("switch-with-k", edit("type: topk, k: 2", "type: switch, k: 1"), 12, 26, "moe.router.k", "switch routes each token to exactly one expert", "remove k"),
    bad("expert-choice-with-k", edit("type: topk, k: 2", "type: expert_choice, k: 2"), 12, 33, "moe.router.k", "expert_choice has no per-token k", "remove k and set capacity.factor"),
    bad("base-with-moe-capacity", edit("type: topk, k: 2", "type: base"), 13, 3, "moe.capacity", "BASE layers have no capacity", "remove this capacity section"),
    bad("override-base-with-capacity", edit(MOE_END, "  overrides:\n    - layers: [1]\n      router: {type: base}\n      capacity: {factor: 2.0}\n"), 16, 7, "moe.overrides[0].capacity", "BASE layers have no capacity", "remove this capacity section"),
    bad("dropless-with-factor", edit("{factor: 1.25}", "{dropless: true, factor: 1.25}"), 13, 30, "moe.capacity.factor", "dropless capacity has no factor", "remove factor or set dropless: false"),
    bad("dropless-with-override-eval-factor", overrides("    - layers: [1]\n      capacity: {eval_factor: 3.0}\n").replace("{factor: 1.25}", "{dropless: true}"), 16, 18, "moe.overrides[0].capacity.eval_factor", "dropless capacity has no eval_factor"),
    bad("dropless-expert-choice", edit("type: topk, k: 2", "type: expert_choice").replace("{factor: 1.25}", "{dropless: true}"), 13, 14, "moe.capacity.dropless", "expert_choice always fills C = T * factor / E slots", "cannot be dropless; remove dropless"),
    bad("shared-d-ff-without-shared", edit("{count: 4}", "{count: 4, shared_count: 0, shared_d_ff: 32}"), 11, 40, "moe.experts.shared_d_ff", "shared_d_ff is set but shared_count is 0", "set experts.shared_count or remove shared_d_ff"),
    bad("shared-gate-with-zero-shared", edit("{count: 4}", "{count: 4, shared_gate: true}"), 11, 23, "moe.experts.shared_gate", "shared_gate is set but shared_count is 0"),
]
# fmt: on


def _errors_of(text: str) -> list:
    with pytest.raises(SpecErrors) as caught:
        plan_from_text(text, "spec.yaml")
    return caught.value.errors


def test_base_spec_is_valid():
    plan = plan_from_text(BASE, "spec.yaml")
    assert [layer.kind for layer in plan.layers] == ["moe"] * 4
    assert plan.parallel.global_batch == 4


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_spec_error_is_located_and_explains_the_fix(case: Bad):
    errors = _errors_of(case.text)
    formatted = [error.format() for error in errors]
    assert len(errors) == 1, "expected exactly one error:\n" + "\n".join(formatted)
    (error,) = errors
    assert (error.line, error.col, error.path) == (case.line, case.col, case.path), formatted[0]
    for fragment in case.says:
        assert fragment in error.message, formatted[0]
    line = error.format()
    assert line.startswith(f"spec.yaml:{case.line}:{case.col}: {case.path}: ")
    assert "\n" not in line and "\r" not in line


def test_case_ids_are_unique_and_numerous():
    assert len({case.id for case in CASES}) == len(CASES) >= 45


def test_only_an_override_is_base_so_moe_capacity_is_for_the_other_layers():
    text = overrides("    - layers: [1]\n      router: {type: base}\n")
    plan = plan_from_text(text, "spec.yaml")
    assert plan.layers[1].moe.router.type == "base" and plan.layers[1].moe.capacity is None
    assert all(plan.layers[i].moe.capacity.factor == 1.25 for i in (0, 2, 3))


def test_exponent_floats_are_numbers_as_in_yaml_1_2():
    # PyYAML (YAML 1.1) would read these as strings; `norm_eps: 1e-5` is how everyone writes it.
    plan = plan_from_text(edit(MODEL_END, MODEL_END + "  norm_eps: 1e-5\n  rope_theta: 5.0e5\n"), "spec.yaml")
    assert (plan.model.norm_eps, plan.model.rope_theta) == (1e-5, 5e5)
    assert plan_from_text(edit("name: tiny", "name: '1e5'"), "spec.yaml").name == "1e5"  # quoted stays text


def test_independent_errors_are_all_reported():
    text = edit("d_model: 64", "d_model: wide").replace("n_layers: 4", "n_layers: -1").replace("parallelism:", "paralelism:")
    errors = _errors_of(text)
    assert [(e.line, e.col, e.path) for e in errors] == [(5, 12, "model.d_model"), (6, 13, "model.n_layers"), (14, 1, "paralelism")]


def test_semantic_errors_are_all_reported():
    text = edit("ep: 2", "ep: 4").replace("k: 2", "k: 5").replace(MODEL_END, MODEL_END + "  n_kv_heads: 3\n")
    errors = _errors_of(text)
    assert [e.path for e in errors] == ["model.n_kv_heads", "moe.router.k", "parallelism.ep"]


def test_one_report_per_place_not_per_layer():
    errors = _errors_of(edit("count: 4", "count: 3"))  # 4 MoE layers share the bad count
    assert len(errors) == 1


# --- files --------------------------------------------------------------------------


def _file_error(path: Path):
    start = time.perf_counter()
    with pytest.raises(SpecErrors) as caught:
        load_plan(path)
    elapsed = time.perf_counter() - start
    errors = caught.value.errors
    assert len(errors) == 1 and "\n" not in errors[0].format()
    assert errors[0].file == str(path)
    return errors[0], elapsed


def test_directory(tmp_path):
    error, _ = _file_error(tmp_path)
    assert (error.line, error.col) == (1, 1) and "is a directory" in error.message and "pass a .yaml file" in error.message


def test_missing_file(tmp_path):
    error, _ = _file_error(tmp_path / "nope.yaml")
    assert "no such file" in error.message and "check the path" in error.message


def test_binary_garbage(tmp_path):
    rng = random.Random(0)
    raw = b"version: 1\nname: x\n" + bytes([0, 0xFF, 0xFE]) + bytes(rng.randrange(256) for _ in range(4096))
    path = tmp_path / "garbage.yaml"
    path.write_bytes(raw)
    error, _ = _file_error(path)
    assert (error.line, error.col) == (3, 2)  # the NUL is valid UTF-8; 0xff is the first bad byte
    assert "byte 0xff is not UTF-8 text" in error.message


def test_nul_in_utf8_text(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_bytes(BASE.replace("d_model: 64", "d_model: 6\x004").encode())
    error, _ = _file_error(path)
    assert (error.line, error.col) == (5, 13) and "#x0000 is not allowed" in error.message


def test_file_over_one_mib(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(BASE + "# " + "x" * MAX_FILE_BYTES + "\n")
    error, _ = _file_error(path)
    assert "over the 1048576-byte limit" in error.message


def test_anchor_bomb_fails_fast_with_a_located_error(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    error, elapsed = _file_error(path)
    assert elapsed < 5.0  # expanding it would take 9**9 values; the node budget stops it at 1e5
    assert 1 <= error.line <= 9 and error.path[0] in "abcdefghi" and "anchor/alias bomb" in error.message and "remove the repeated aliases" in error.message


def test_recursive_alias(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text(BASE + "extra: &loop {again: *loop}\n")
    error, elapsed = _file_error(path)
    assert (error.line, error.col) == (18, 8) and error.path.startswith("extra.again.again")
    assert "recursive alias" in error.message and elapsed < 5.0


def test_spec_layer_never_imports_torch():
    code = (
        "import importlib, pathlib, pkgutil, sys\n"
        "import moespec.spec\n"
        "assert 'torch' not in sys.modules, 'import moespec.spec loaded torch'\n"
        "for module in pkgutil.iter_modules(moespec.spec.__path__):\n"
        "    importlib.import_module('moespec.spec.' + module.name)\n"
        "    assert 'torch' not in sys.modules, f'moespec.spec.{module.name} loaded torch'\n"
        "specs = sorted(pathlib.Path('specs').glob('*.yaml'))\n"
        "assert specs\n"
        "for path in specs:\n"
        "    moespec.spec.load_plan(path).to_dict()\n"
        "assert 'torch' not in sys.modules, 'loading the example specs loaded torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
