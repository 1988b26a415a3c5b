"""Weights both ways: tiny random Hugging Face models (built here from configs, nothing
downloaded) saved with `save_pretrained`, imported by `moespec import`, loaded by
`compile --weights`: logits equal HF's to 1e-5 in fp32 (eval, dropless routing). And back:
`moespec export` writes a checkpoint transformers loads as the same model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_here import run_here

transformers = pytest.importorskip("transformers")  # a test extra: installed by `make test`
import torch  # noqa: E402

from moespec.interop.hf_weights import load_hf_weights  # noqa: E402
from moespec.model.build import build_model  # noqa: E402
from moespec.spec import load_plan  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            eos_token_id=1, pad_token_id=0, bos_token_id=2)  # fmt: skip
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=24, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                  head_dim=16, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    # Multi-head Latent Attention; V3's and V2's interleaved RoPE rows are permuted on load
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                        q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, num_key_value_heads=4),
    "deepseek_v2": dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1,
                        q_lora_rank=None, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12),
    # GLM-4.5: RoPE on half of each head, q/k/v biases, DeepSeek-style routing
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                     head_dim=16, partial_rotary_factor=0.5, attention_bias=True, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    # gpt-oss: sinks, alternating 8-token windows (seq 32), biases everywhere, the clamped SwiGLU; RoPE unscaled
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, intermediate_size=32, sliding_window=8,
                    rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    # Llama-4: MoE every other layer, input-gated top-1 with a shared expert, L2 QK-norm, a NoPE layer, interleaved RoPE
    "llama4_text": dict(intermediate_size=32, intermediate_size_mlp=96, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                        interleave_moe_layer_step=2, rope_scaling=None, no_rope_layers=[1, 0]),
    # ERNIE-4.5: top-k chosen with a frozen score correction, shared experts, the first layer dense, interleaved RoPE
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=2, moe_layer_start_index=1,
                         head_dim=16, tie_word_embeddings=True),
    # muP multipliers at 1 (moespec lists them, does not apply them); attention_multiplier = 1/sqrt(head_dim)
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=1.0, logits_scaling=1.0,
                       residual_multiplier=1.0, attention_multiplier=0.25),
    # Phi-3.5-MoE: SparseMixer-v2 routing, LayerNorm, biases on q, k, v, o and the LM head (its jitter sets the mask's width)
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3),
    # DBRX: its own names, a fused Wqkv, expert banks [E*F, D], LayerNorm without bias, top-k renormalised (p = 1);
    # clip_qkv far above the activations (listed on import, not applied; transformers 5 fails without one)
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=128,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 1000.0}, ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}),
}  # fmt: skip
OWN_CONFIG = {"dbrx"}  # families whose config takes its own field names, not TINY's


def moespec_cli(*args: str) -> subprocess.CompletedProcess:
    return run_here(*args)


def tiny_hf_model(family: str, folder: Path):
    """A random HF model of `family`, weights drawn wide enough that routing is not a tie."""
    torch.manual_seed(0)
    config = transformers.CONFIG_MAPPING[family](**(FAMILIES[family] if family in OWN_CONFIG else TINY | FAMILIES[family]))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the selection bias: a checkpoint value, not zero
                buffer.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_imported_spec_with_hf_weights_gives_hf_logits(family, tmp_path):
    hf = tiny_hf_model(family, tmp_path / "hf")
    spec = tmp_path / "spec.yaml"
    done = moespec_cli("import", str(tmp_path / "hf"), "-o", str(spec), "--seq-len", "32")
    assert done.returncode == 0, done.stderr
    plan = load_plan(spec)
    model = build_model(plan, seed=5)
    kept = [k for k in model.state_dict() if not (family == "llama4_text" and k.endswith("router.expert_bias_E"))]  # Llama-4 has no selection bias
    assert load_hf_weights(model, tmp_path / "hf") == len(kept)
    model.eval()
    x = tokens()
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_compile_weights_from_the_cli(tmp_path):
    tiny_hf_model("qwen2_moe", tmp_path / "hf")
    spec = tmp_path / "spec.yaml"
    assert moespec_cli("import", str(tmp_path / "hf"), "-o", str(spec), "--seq-len", "32").returncode == 0
    done = moespec_cli("compile", str(spec), "--weights", str(tmp_path / "hf"), "--check", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["weights"]["tensors"] == 37 and report["device"] == "cpu"  # 2 layers x 17 + embedding, norm, head


def test_a_checkpoint_of_another_shape_is_one_line(tmp_path):
    tiny_hf_model("mixtral", tmp_path / "hf")
    spec = tmp_path / "spec.yaml"
    assert moespec_cli("import", str(tmp_path / "hf"), "-o", str(spec), "--seq-len", "32").returncode == 0
    text = spec.read_text().replace("count: 4", "count: 8")
    spec.write_text(text)
    done = moespec_cli("compile", str(spec), "--weights", str(tmp_path / "hf"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "blocks.0.moe.router.gate.weight is (4, 64)" in done.stderr and "(8, 64)" in done.stderr
    done = moespec_cli("compile", str(spec), "--weights", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "no .safetensors files" in done.stderr


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "glm4_moe", "dots1", "phimoe", "dbrx",
                                    "granitemoe", "ernie4_5_moe", "llama4_text", "deepseek_v2"])  # fmt: skip
def test_export_loads_in_transformers_as_the_same_model(family, tmp_path):
    tiny_hf_model(family, tmp_path / "hf")  # only for its config: export writes our own seeded weights
    spec = tmp_path / "spec.yaml"
    assert moespec_cli("import", str(tmp_path / "hf"), "-o", str(spec), "--seq-len", "32").returncode == 0
    done = moespec_cli("export", str(spec), "--family", family, "-o", str(tmp_path / "out"), "--seed", "3", "--json")
    assert done.returncode == 0, done.stderr
    plan = load_plan(spec)
    ours = build_model(plan, seed=3).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens()
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("spec,family,key", [("tiny-switch", "mixtral", "moe.router.type"), ("tiny-oss", "mixtral", "model.activation"),
                                              ("tiny-mla", "qwen3_moe", "model.mla"), ("tiny-oss", "deepseek_v3", "model.activation"),
                                              ("tiny-llama4", "mixtral", "moe.experts.gate_input")])  # fmt: skip
def test_export_refuses_a_key_the_family_cannot_hold(tmp_path, spec, family, key):
    done = moespec_cli("export", str(Path(__file__).resolve().parents[1] / f"specs/{spec}.yaml"), "--family", family, "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and f"{key}:" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
