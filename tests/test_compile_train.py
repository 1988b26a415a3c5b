"""The corpus, the training loop and the `compile` / `train` commands, with real numbers:
the loss falls on the shipped text, saved weights load back bit for bit, the CLI refuses bad
input with one line and exit code 2."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moespec.cli.app import app
from moespec.data.corpus import get_batch, load_corpus_bytes, load_split
from moespec.model.build import build_model
from moespec.spec import load_plan
from moespec.spec.plan import LayerPlan
from moespec.train import autocast_for, check_step, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs" / "tiny-topk.yaml"
MIXTRAL = ROOT / "specs" / "mixtral-8x7b.yaml"
UNIFORM_BYTE_LOSS = math.log(256)  # 5.545: cross-entropy of a model that knows nothing

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


# --- corpus ---------------------------------------------------------------------------------


def test_corpus_is_the_shipped_python_docs_with_its_licence():
    data = load_corpus_bytes()
    assert 200_000 < len(data) <= 256 * 1024
    assert data.startswith(b'The "assert" statement')
    here = ROOT / "moespec" / "data"
    assert "Python Software Foundation" in (here / "LICENSE-PSF.txt").read_text()
    assert "pydoc_data.topics" in (here / "README.md").read_text()


def test_split_is_deterministic_and_batches_are_windows_of_it():
    a, b = load_split(), load_split()
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert len(a.val) == len(load_corpus_bytes()) - int(len(load_corpus_bytes()) * 0.9)
    batch = get_batch(a.train, batch=3, seq_len=8, generator=torch.Generator().manual_seed(0))
    again = get_batch(a.train, batch=3, seq_len=8, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (3, 9) and batch.dtype == torch.long and torch.equal(batch, again)
    text = bytes(a.train.tolist())
    assert all(bytes(row.tolist()) in text for row in batch)  # each row is a contiguous window


# --- the training loop ----------------------------------------------------------------------


def test_training_on_the_corpus_lowers_the_loss():
    plan = load_plan(TINY)
    result = train(build_model(plan, seed=0), plan, steps=40, lr=3e-3, seed=0, eval_every=20, eval_batches=2)
    losses = [r.loss for r in result.records]
    assert all(math.isfinite(x) for x in losses)
    # A random init starts at the uniform-byte loss; 40 steps learn the byte frequencies and
    # more (measured: 5.57 -> 3.0). Bounds leave room for other BLAS kernels.
    assert result.first_loss == pytest.approx(UNIFORM_BYTE_LOSS, abs=0.15)
    assert result.last_loss < result.first_loss - 1.5
    assert result.final_val_loss < result.initial_val_loss - 1.5
    assert result.records[19].val_loss is not None and result.records[0].val_loss is None
    for record in result.records:  # every token routed to k=2 experts in each MoE layer
        assert sorted(record.tokens_per_expert) == [1, 3]
        assert all(sum(counts) == 8 * 64 * 2 for counts in record.tokens_per_expert.values())
        assert record.aux_loss > 0
    assert sum(result.tokens_per_expert_total[1]) == 40 * 8 * 64 * 2


def test_training_calls_the_router_bias_update():
    plan = load_plan(ROOT / "specs" / "tiny-sigmoid-bias.yaml")
    model = build_model(plan, seed=0)
    train(model, plan, steps=3, batch=2)
    biases = [buf for name, buf in model.named_buffers() if name.endswith("expert_bias_E")]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # moved from zero by the updates


def test_bf16_autocast_trains_like_fp32():
    """bf16 autocast runs the matmuls in bf16 (the logits come out bf16) on fp32 parameters,
    and follows the fp32 run: the same first loss to bf16 rounding and the same descent."""
    plan = load_plan(TINY)
    bf16 = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, precision="bf16"))
    model = build_model(bf16, seed=0)
    with autocast_for("bf16", torch.device("cpu")):
        logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.parameters())
    low = train(model, bf16, steps=20, batch=2)
    full = train(build_model(plan, seed=0), plan, steps=20, batch=2)
    # bf16 keeps 8 mantissa bits (2^-9 relative per rounding); a loss of ~5.5 summed over
    # 256-way softmaxes lands within ~1% of the fp32 one.
    assert low.records[0].ce_loss == pytest.approx(full.records[0].ce_loss, rel=1e-2)
    assert low.last_loss < low.first_loss - 0.5 and abs(low.last_loss - full.last_loss) < 0.1 * full.last_loss


def test_training_refuses_a_vocabulary_smaller_than_bytes():
    plan = load_plan(TINY)
    plan = dataclasses.replace(plan, model=dataclasses.replace(plan.model, vocab_size=100))
    with pytest.raises(ValueError, match="vocab_size"):
        train(build_model(plan), plan, steps=1)


# --- moespec compile ------------------------------------------------------------------------


def test_compile_json_reports_counts_and_a_check():
    result = invoke("compile", TINY, "--check", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["device"] == "cpu"
    # tiny-topk by hand: V=256, D=64, 4 layers (MoE at 1 and 3), 4 heads of 16, swiglu, rmsnorm,
    # rope, untied. Embedding 256*64 = 16384, head 16384, final norm 64.
    # Every block: q, k, v, o 4*64*64 = 16384 + two norms 2*64 = 128.
    # Dense block: 16384 + 128 + ffn 3*64*128 = 24576 -> 41088.
    # MoE block: 16384 + 128 + router 64*4 = 256 + 4 experts of 3*64*64 = 12288 -> 65920,
    # of which top-2 touches 2 experts per token -> 41344 active.
    assert doc["params"]["total"] == 16384 + 16384 + 64 + 2 * 41088 + 2 * 65920 == 246_848
    assert doc["params"]["active"] == 16384 + 16384 + 64 + 2 * 41088 + 2 * 41344 == 197_696
    assert doc["params"]["embeddings_in_active"] is True
    assert doc["check"]["logits_shape"] == [8, 64, 256]
    assert doc["check"]["ce_loss"] == pytest.approx(UNIFORM_BYTE_LOSS, abs=0.1)  # random tokens, fresh model
    assert doc["check"]["aux_loss"] > 0
    assert doc["out"] is None


@pytest.mark.parametrize("name,total,active,n_layers", [
    ("mixtral-8x7b", 46_702_792_704, 12_879_925_248, 32),  # Hugging Face Mixtral-8x7B exactly; 12.9B active published
    ("qwen1.5-moe-a2.7b", 14_315_784_192, 2_689_173_504, 24),  # Hugging Face Qwen1.5-MoE-A2.7B exactly (see test_sim_counts)
])  # fmt: skip
def test_compile_full_size_spec_goes_to_meta(name, total, active, n_layers):
    result = invoke("compile", ROOT / "specs" / f"{name}.yaml", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["device"] == "meta"
    assert doc["params"]["total"] == total and doc["params"]["active"] == active
    assert len(doc["params"]["layers"]) == n_layers


def test_check_on_meta_propagates_shapes_only():
    plan = load_plan(TINY)
    dense = dataclasses.replace(
        plan, layers=tuple(LayerPlan(index=i, kind="dense", d_ff=plan.model.d_ff, moe=None) for i in range(4))
    )
    result = check_step(build_model(dense, device="meta"), batch=2, seq_len=64, vocab_size=256)
    assert result["device"] == "meta" and result["logits_shape"] == [2, 64, 256] and result["loss"] is None
    assert result["params_with_grad"] == 16384 + 16384 + 64 + 4 * 41088 == 197_184  # tiny-topk all dense (see above)


def test_compile_check_on_meta_runs_capacity_moe_layers():
    # Capacity-mode MoE layers never read routed values back, so they run on meta too.
    result = invoke("compile", TINY, "--device", "meta", "--check", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["device"] == "meta" and doc["check"]["logits_shape"] == [8, 64, 256] and doc["check"]["loss"] is None


def test_compile_out_writes_loadable_files_and_no_temp_files(tmp_path):
    out = tmp_path / "compiled"
    result = invoke("compile", TINY, "--out", out, "--seed", "3", "--json")
    assert result.exit_code == 0, result.stderr
    try:  # safetensors is the optional `io` extra; without it the weights go through torch.save
        from safetensors.torch import load_file

        weights_name, load = "model.safetensors", load_file
    except ImportError:
        weights_name, load = "model.pt", torch.load
    assert sorted(p.name for p in out.iterdir()) == sorted([weights_name, "spec.json"])  # no temp files left
    plan = load_plan(TINY)
    assert json.loads((out / "spec.json").read_text()) == json.loads(json.dumps(plan.to_dict()))
    reference = build_model(plan, seed=3).eval()
    loaded = build_model(plan, seed=99).eval()
    loaded.load_state_dict(load(out / weights_name), strict=True)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], reference(tokens)[0])


def test_compile_human_output_and_meta_out_refusal(tmp_path):
    result = invoke("compile", TINY)
    assert result.exit_code == 0, result.stderr
    assert "246,848" in result.stdout
    refused = invoke("compile", MIXTRAL, "--out", tmp_path / "x")
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1 and "46,702,792,704" in refused.stderr
    assert not (tmp_path / "x").exists()


def moespec(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "moespec", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["compile"], ["train", "--steps", "2"]])
def test_bad_path_is_one_line_and_exit_2(command, tmp_path):
    result = moespec(command[0], str(tmp_path / "missing.yaml"), *command[1:])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no such file" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout and result.stdout == ""


# --- moespec train --------------------------------------------------------------------------


def test_train_json_reports_every_step():
    result = invoke("train", TINY, "--steps", "3", "--batch", "2", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [r["step"] for r in doc["records"]] == [1, 2, 3]
    assert doc["first_loss"] == doc["records"][0]["ce_loss"]
    assert doc["params"]["total"] == 246_848
    assert sum(doc["tokens_per_expert_total"]["1"]) == 3 * 2 * 64 * 2
    assert doc["final_val_loss"] == doc["records"][-1]["val_loss"]


def test_train_refuses_a_full_size_spec_and_bad_options():
    result = invoke("train", MIXTRAL, "--steps", "1", "--single-process")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    # the limit is memory, from the simulator's per-rank peak, not a parameter count
    assert "46,702,792,704 parameters" in result.stderr and "GiB per rank" in result.stderr, result.stderr
    assert invoke("train", TINY, "--steps", "0").exit_code == 2
    assert invoke("train", TINY, "--steps", "1", "--lr", "-1").exit_code == 2


def test_compile_says_which_auction_a_base_layer_runs(monkeypatch):
    """A BASE spec's plan names the auction's engine: compiled where setup.py built the kernels
    (as `make test` does), numpy with a one-line reason where they are missing; a spec without
    BASE layers says nothing."""
    from moespec.model import auction_kernels

    compiled = invoke("compile", ROOT / "specs" / "tiny-base.yaml", "--json")
    assert compiled.exit_code == 0 and json.loads(compiled.stdout)["base_auction"] == "compiled"
    assert json.loads(invoke("compile", ROOT / "specs" / "tiny-ep.yaml", "--json").stdout)["base_auction"] is None
    monkeypatch.setattr(auction_kernels, "_KERNELS", None)  # as after an install without a C compiler
    fallback = invoke("compile", ROOT / "specs" / "tiny-base.yaml")
    assert fallback.exit_code == 0
    assert "BASE auction on CPU: in numpy, as the compiled kernels were not built" in fallback.stdout
