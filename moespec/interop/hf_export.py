"""A moespec spec as a Hugging Face config.json (the inverse of hf_config.py), for `export`.

Only families whose every feature the spec can hold are written, and a spec key the chosen
family cannot express is an error naming the key: an exported checkpoint must load into
transformers as the same model it was in moespec (tests/test_hf_weights.py checks logits).
"""

from __future__ import annotations

EXPORT_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def export_config(plan, family: str) -> dict:
    """The config.json of `family` describing `plan`, or ValueError naming the first spec
    key that family cannot hold (so an exported checkpoint always loads into the same model)."""
    if family not in EXPORT_FAMILIES:
        raise ValueError(f"--hf-family: {family!r} is not exported (choose one of {', '.join(EXPORT_FAMILIES)})")
    m = plan.model
    moe_layers = plan.moe_layers
    if not moe_layers:
        raise ValueError("moe: the spec has no MoE layer; export writes MoE families")
    first = moe_layers[0].moe
    want = {  # (what the family needs, the spec key that breaks it)
        "model.activation": m.activation == "swiglu", "model.norm": m.norm == "rmsnorm", "model.positions": m.positions == "rope",
        "model.out_bias": not m.out_bias, "model.lm_head_bias": not m.lm_head_bias, "model.dropout": m.dropout == 0.0,
        "moe.overrides": all(layer.moe == first for layer in moe_layers), "moe.router.type": first.router.type == "topk",
        "moe.router.bias": not getattr(first.router, "bias", False), "moe.capacity": first.capacity is None or first.capacity.dropless,
        "model.qk_norm": m.qk_norm == {"qwen3_moe": "per_head", "olmoe": "full"}.get(family, "none"),
        "model.qkv_bias": m.qkv_bias == (family == "qwen2_moe"),
        "moe.experts.shared_count": (first.experts.shared_count == 1 and first.experts.shared_gate) if family == "qwen2_moe" else first.experts.shared_count == 0,
    }  # fmt: skip
    _refuse_first(want, family)
    want = {}
    if family in ("mixtral", "olmoe"):
        want["moe.placement"] = len(moe_layers) == m.n_layers
    if family == "mixtral":
        want["moe.router.normalize"] = first.router.normalize
        want["moe.experts.d_ff"] = first.experts.d_ff == m.d_ff
    if family == "olmoe":
        want["moe.experts.d_ff"] = first.experts.d_ff == m.d_ff
    _refuse_first(want, family)
    config = {
        "architectures": [{"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                           "olmoe": "OlmoeForCausalLM"}[family]],
        "model_type": family, "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "tie_word_embeddings": m.tied_embeddings, "num_experts_per_tok": first.router.k,
        "router_aux_loss_coef": first.router.aux_loss_coef, "torch_dtype": "float32",
    }  # fmt: skip
    if family == "mixtral":
        config |= {"num_local_experts": first.experts.count, "sliding_window": None}
    else:
        config |= {"num_experts": first.experts.count, "norm_topk_prob": first.router.normalize}
    if family in ("qwen2_moe", "qwen3_moe"):
        dense = [layer.index for layer in plan.layers if layer.moe is None]
        config |= {"moe_intermediate_size": first.experts.d_ff, "decoder_sparse_step": 1, "mlp_only_layers": dense,
                   "use_sliding_window": False, "attention_bias": False}  # fmt: skip
    if family == "qwen2_moe":
        config |= {"shared_expert_intermediate_size": first.experts.shared_d_ff, "qkv_bias": True}
    if family == "olmoe":
        config |= {"clip_qkv": None, "attention_bias": False}
    return config


def _refuse_first(checks: dict[str, bool], family: str) -> None:
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"{key}: the spec's value has no place in a {family} config; export to another family or change the spec")
