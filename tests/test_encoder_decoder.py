"""Encoder-decoders (T5-style: Switch Transformer, ST-MoE): the spec keys, the compiled model
against Hugging Face's SwitchTransformers (counts, logits, export), span-corruption training,
and the simulator's parts (saved activations, op list) against the real model's traces.
Parameters, matmul FLOPs and all-to-all bytes are checked with every spec elsewhere
(test_sim_counts.py, test_distributed.py's t5 case)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_here import run_here
import torch
import yaml

from moespec.model.build import build_model
from moespec.model.counting import count_parameters
from moespec.sim.counts import predict_params
from moespec.spec import load_plan, plan_from_text

ROOT = Path(__file__).resolve().parents[1]


def moespec_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_here(*args)


def t5_variant(tmp_path: Path, edit=None, base: str = "tiny-t5-switch"):
    data = yaml.safe_load((ROOT / "specs" / f"{base}.yaml").read_text())
    if edit:
        edit(data)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_plan(path), path


@pytest.mark.parametrize("name,total", [("switch-base-8", 619_339_008), ("switch-base-128", 7_415_217_408), ("st-moe-32b", 268_562_646_016)])
def test_published_encoder_decoders_count_exactly(name, total):
    """Switch-Base-8/128: Hugging Face's counts (tests/test_hf_import.py builds them); ST-MoE-32B: 269B published."""
    plan = load_plan(ROOT / "specs" / f"{name}.yaml")
    assert predict_params(plan).total == total
    assert count_parameters(build_model(plan, device="meta"), plan).total == total


# --- the spec: what an encoder needs and excludes, each one line ------------------------------


@pytest.mark.parametrize("edit,key", [
    (lambda d: d["model"].pop("encoder"), "model.positions"),  # relative positions without an encoder
    (lambda d: d["model"].update(positions="rope"), "model.positions"),
    (lambda d: d["parallelism"].update(recompute="selective"), "parallelism.recompute"),
    (lambda d: d["moe"].update(overrides=[{"layers": [1], "router": {"type": "topk", "k": 2}}]), "moe.overrides"),
    (lambda d: d["model"].update(qk_norm="full"), "model.qk_norm"),
    (lambda d: d["model"].update(n_kv_heads=2), "model.n_kv_heads"),
    (lambda d: d["model"].update(attention_sinks=True), "model.attention_sinks"),
    (lambda d: d["model"].update(rope_theta=5000.0), "model.rope_theta"),  # written, but relative positions have no RoPE
    (lambda d: d["model"].update(seq_len=2), "model.seq_len"),  # too short for span-corruption targets
], ids=["relative-without-encoder", "rope-with-encoder", "selective-recompute", "overrides", "qk-norm", "gqa", "sinks", "rope-theta",
        "short-targets"])  # fmt: skip
def test_keys_an_encoder_decoder_cannot_take_are_refused(tmp_path, edit, key):
    data = yaml.safe_load((ROOT / "specs/tiny-t5-switch.yaml").read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    done = moespec_cli("validate", str(path))
    assert done.returncode == 2 and f"{key}:" in done.stderr, done.stderr
    assert all(line.startswith(str(path)) for line in done.stderr.strip().splitlines())


def test_placement_applies_to_each_stack():
    plan = load_plan(ROOT / "specs/switch-base-8.yaml")
    stacks = {stack: [layer.index for layer in plan.moe_layers if layer.stack == stack] for stack in ("encoder", "decoder")}
    assert stacks == {"encoder": [1, 3, 5, 7, 9, 11], "decoder": [13, 15, 17, 19, 21, 23]}  # numbered through the model
    tokens = {layer.stack: plan.tokens_of(layer) for layer in plan.moe_layers}
    assert tokens == {"encoder": 8 * 512, "decoder": 8 * 114}  # each stack routes its own tokens


# --- Hugging Face: import, weights, export -----------------------------------------------------


def tiny_switch(folder: Path, **overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(**({
        "vocab_size": 300, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 3, "num_decoder_layers": 2, "num_heads": 4,
        "num_experts": 4, "expert_capacity": 64, "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20, "dropout_rate": 0.0} | overrides))  # fmt: skip
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # wide enough that routing is not a tie
    model.save_pretrained(folder)
    return model


def test_untied_switch_is_refused_naming_the_field(tmp_path):
    """transformers' untied Switch keeps three embedding tables (shared, encoder's, decoder's)."""
    tiny_switch(tmp_path / "hf", tie_word_embeddings=False)
    done = moespec_cli("import", str(tmp_path / "hf"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "tie_word_embeddings:" in done.stderr, done.stderr


def test_switch_weights_give_hugging_faces_logits(tmp_path):
    """A tiny random SwitchTransformers (3 + 2 blocks, an expert layer in each stack), imported
    and loaded: logits equal HF's in fp32, eval, with capacity that drops nothing in either."""
    from moespec.interop.hf_weights import load_hf_weights

    hf = tiny_switch(tmp_path / "hf")
    spec = tmp_path / "spec.yaml"
    done = moespec_cli("import", str(tmp_path / "hf"), "-o", str(spec), "--seq-len", "24")
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load(spec.read_text())
    assert data["model"]["encoder"] == {"n_layers": 3, "seq_len": 24} and data["model"]["tied_embeddings"] is True
    data["moe"]["capacity"] = {"dropless": True}
    plan = plan_from_text(yaml.safe_dump(data), "imported")
    model = build_model(plan, seed=5)
    assert count_parameters(model, plan).total == sum(p.numel() for p in hf.parameters())
    assert load_hf_weights(model, tmp_path / "hf") == len(model.state_dict())
    model.eval()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 300, (2, 24), generator=generator), torch.randint(0, 300, (2, 7), generator=generator)
    with torch.no_grad():
        ours, _ = model(x, y)
        theirs = hf(input_ids=x, decoder_input_ids=y).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_export_switch_loads_in_transformers_as_the_same_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    # capacity that never drops at eval in either routing (HF: per sequence; moespec: per micro-batch)
    plan, path = t5_variant(tmp_path, lambda d: (d["moe"].update(capacity={"factor": 4.0, "eval_factor": 4.0}), d["moe"]["experts"].pop("d_ff")))
    done = moespec_cli("export", str(path), "--family", "switch_transformers", "-o", str(tmp_path / "out"), "--seed", "3", "--json")
    assert done.returncode == 0, done.stderr
    ours = build_model(plan, seed=3).eval()
    theirs = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert sum(p.numel() for p in theirs.parameters()) == count_parameters(ours, plan).total
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 384, (2, 96), generator=generator), torch.randint(0, 384, (2, 32), generator=generator)
    with torch.no_grad():
        assert (ours(x, y)[0] - theirs(input_ids=x, decoder_input_ids=y).logits).abs().max().item() < 1e-5
    done = moespec_cli("export", str(ROOT / "specs/tiny-topk.yaml"), "--family", "switch_transformers", "-o", str(tmp_path / "no"))
    assert done.returncode == 2 and "model.encoder:" in done.stderr and done.stderr.count("\n") == 1


# --- training: span corruption on the byte corpus ----------------------------------------------


def test_span_corruption_training_lowers_the_validation_loss(tmp_path):
    done = moespec_cli("train", str(ROOT / "specs/tiny-t5-switch.yaml"), "--steps", "40", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["final_val_loss"] < report["initial_val_loss"] - 1.0, report  # ~5.9 -> ~4.3 in 40 steps
    assert set(report["tokens_per_expert_total"]) == {"1", "3"}  # the encoder's MoE block and the decoder's


def test_compile_check_runs_an_encoder_decoder_step():
    done = moespec_cli("compile", str(ROOT / "specs/tiny-t5-switch.yaml"), "--check", "--json")
    assert done.returncode == 0, done.stderr
    check = json.loads(done.stdout)["check"]
    assert check["logits_shape"] == [8, 32, 384] and check["moe_layers"] == 2
    assert check["params_with_grad"] == predict_params(load_plan(ROOT / "specs/tiny-t5-switch.yaml")).total


# --- the simulator's fitted parts against the model's traces -----------------------------------


def _topk(d):
    d["moe"]["router"] = {"type": "topk", "k": 2}  # Switch's jitter keeps two tensors the table does not describe (test_activation_bytes.py)


@pytest.mark.parametrize("edit", [
    lambda d: None,
    lambda d: d["parallelism"].update(precision="bf16"),  # SDPA's math path upcasts under autocast
    lambda d: d["model"].update(dropout=0.1),  # dropout: every attention on the math path, masks
    lambda d: (d["model"].update(n_layers=3), d["model"]["encoder"].update(n_layers=4, seq_len=80)),
    lambda d: d["model"].update(tied_embeddings=False, norm="layernorm", activation="swiglu"),
    lambda d: d["moe"].update(capacity={"dropless": True}),
], ids=["base", "bf16", "dropout", "deeper", "untied-layernorm-swiglu", "dropless"])  # fmt: skip
def test_saved_activations_equal_the_trace(tmp_path, edit):
    from test_activation_bytes import predicted_saved_bytes, traced_saved_bytes

    plan, _ = t5_variant(tmp_path, lambda d: (_topk(d), edit(d)))
    assert predicted_saved_bytes(plan) == pytest.approx(traced_saved_bytes(plan), rel=0.005)


T5_OPS = """
version: 1
name: t5ops
model: {{vocab_size: 320, d_model: 16, n_layers: {ld}, n_heads: 2, d_ff: 32, seq_len: 16, positions: relative, tied_embeddings: true,
        activation: relu, encoder: {{n_layers: {le}, seq_len: 24}} {model}}}
{moe}
parallelism: {{micro_batch: 2 {parallel}}}
"""


@pytest.mark.parametrize("le,ld,model,moe,parallel", [
    (1, 1, "", "", ""), (2, 3, "", "", ""), (3, 2, ", norm: layernorm", "", ""), (2, 2, ", dropout: 0.1", "", ""),
    (2, 2, "", "moe: {placement: {type: every, every: 2, offset: 1}, experts: {count: 4, d_ff: 16}, router: {type: switch}, capacity: {factor: 1.25}}", ""),
    (2, 2, "", "moe: {experts: {count: 4, d_ff: 16}, router: {type: topk, k: 2}, capacity: {dropless: true}}", ", precision: bf16, global_batch: 4"),
], ids=["1+1", "2+3", "3+2-layernorm", "dropout", "switch-capacity", "dropless-bf16-accum"])  # fmt: skip
def test_op_list_matches_the_dispatched_ops(le, ld, model, moe, parallel):
    """ENCODER_STACK_OPS, RELATIVE_BLOCK_OPS and CROSS_ATTENTION_OPS were fitted on 1+1, 2+1,
    1+2, 2+3 and 3+2 dense fp32 models; the other cases were not fitted on."""
    from moespec.profiling.optrace import trace_step_ops
    from moespec.sim import ops, tensors
    from moespec.sim.design import DesignBatch

    plan = plan_from_text(T5_OPS.format(le=le, ld=ld, model=model, moe=moe, parallel=parallel), "t5ops")
    traced = trace_step_ops(plan)
    batch = DesignBatch.from_plans([plan])
    assert int(tensors.param_tensors(batch)[0]) == len(list(build_model(plan).parameters()))
    assert traced["optimizer"] == ops.OPTIMIZER_OPS + ops.OPTIMIZER_OPS_PER_TENSOR * int(tensors.trained_tensors(batch)[0])
    host = sum(float(ops.other_ops(part)[0][0]) for part in (batch, batch.encoder)) * plan.parallel.grad_accum
    kernel = sum(float(part.table.per_design(part.table.count * (k - mm), 1)[0]) for part in (batch, batch.encoder)
                 for k, mm in [ops.dropless_kernel_ops(part, part.table)]) * plan.parallel.grad_accum  # fmt: skip
    assert abs(host + kernel - traced["other"]) <= 0.05 * traced["other"], (host, kernel, traced["other"])


def test_simulate_reports_both_stacks_tokens(tmp_path):
    done = moespec_cli("simulate", str(ROOT / "specs/switch-base-8.yaml"), "--backend", "dgx-h100", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["params"]["total"] == 619_339_008
    parts = report["step_flops_by_part"]
    assert parts["cross_attention"] > 0 and parts["experts_capacity"] > 0
    time = report["time"]
    assert time["tokens_per_s"] * time["step_s"] == pytest.approx(256 * (512 + 114))  # inputs and targets


def test_explore_refuses_an_encoder_decoder_base_in_one_line(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"version: 1\nname: t5\nbase: {ROOT / 'specs/tiny-t5-switch.yaml'}\nbackend: cpu-local\n"
                     "axes:\n  moe.experts.count: [2, 4]\nobjectives:\n  tokens_per_s: max\n")  # fmt: skip
    done = moespec_cli("explore", str(sweep), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is an encoder-decoder" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
