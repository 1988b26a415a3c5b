"""A moespec spec as a Hugging Face config.json (the inverse of hf_config.py), for `export`.

Only families whose every feature the spec can hold are written, and a spec key the chosen
family cannot express is an error naming the key: an exported checkpoint must load into
transformers as the same model it was in moespec (tests/test_hf_weights.py checks logits).
"""

from __future__ import annotations

EXPORT_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch_transformers", "glm4_moe", "dots1",
                   "phimoe", "dbrx", "granitemoe", "ernie4_5_moe", "llama4_text", "deepseek_v2")  # fmt: skip
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}  # fmt: skip


def export_config(plan, family: str) -> dict:
    """The config.json of `family` describing `plan`, or ValueError naming the first spec
    key that family cannot hold (so an exported checkpoint always loads into the same model)."""
    if family not in EXPORT_FAMILIES:
        raise ValueError(f"--family: {family!r} is not exported (choose one of {', '.join(EXPORT_FAMILIES)})")
    if family == "switch_transformers":
        from moespec.interop.hf_switch import export_config as switch_config

        return switch_config(plan)
    if family in ("glm4_moe", "dots1", "phimoe", "dbrx", "granitemoe", "ernie4_5_moe", "llama4_text", "deepseek_v2"):
        from moespec.interop import hf_export_more as more

        if not plan.moe_layers:
            raise ValueError("moe: the spec has no MoE layer; export writes MoE families")
        return more.deepseek_like(plan, family) if family in ("glm4_moe", "dots1") else getattr(more, family)(plan)
    m = plan.model
    moe_layers = plan.moe_layers
    if not moe_layers:
        raise ValueError("moe: the spec has no MoE layer; export writes MoE families")
    first = moe_layers[0].moe
    oss, deepseek = family == "gpt_oss", family == "deepseek_v3"
    router = first.router
    want = {  # the spec key, and whether the family holds its value
        "model.host": m.host == "transformer", "model.encoder": m.encoder is None,
        "model.activation": m.activation == ("swiglu_clamped" if oss else "swiglu"), "model.norm": m.norm == "rmsnorm",
        "model.positions": m.positions == "rope", "model.lm_head_bias": not m.lm_head_bias, "model.dropout": m.dropout == 0.0,
        "model.rope_fraction": m.rope_fraction == 1.0, "model.mla": (m.mla is not None) == deepseek,
        "model.attention_sinks": m.attention_sinks == oss, "model.sliding_window": oss or m.window is None,
        "moe.overrides": all(layer.moe == first for layer in moe_layers), "moe.experts.bias": first.experts.bias == oss,
        "moe.experts.gate_input": not first.experts.gate_input, "model.nope_layers": not m.nope_layers,
        "moe.router.selection_bias": not getattr(router, "selection_bias", False),
        "moe.router.type": router.type == ("sigmoid_bias" if deepseek else "topk"),
        "moe.router.bias": bool(getattr(router, "bias", False)) == oss, "moe.capacity": first.capacity is None or first.capacity.dropless,
        "model.qk_norm": m.qk_norm == {"qwen3_moe": "per_head", "olmoe": "full"}.get(family, "none"),
        "model.qkv_bias": m.qkv_bias == (family == "qwen2_moe" or (oss and m.out_bias)),
        "model.out_bias": m.out_bias == (oss and m.qkv_bias),
        "moe.experts.shared_count": (first.experts.shared_count == 1 and first.experts.shared_gate) if family == "qwen2_moe"
        else (not first.experts.shared_gate and first.experts.shared_d_ff == first.experts.d_ff) if deepseek and first.experts.shared_count
        else deepseek or first.experts.shared_count == 0,
    }  # fmt: skip
    _refuse_first(want, family)
    dense = [layer.index for layer in plan.layers if layer.moe is None]
    want = {}
    if family in ("mixtral", "olmoe", "gpt_oss"):
        want["moe.placement"] = not dense
    if deepseek:
        want["moe.placement"] = dense == list(range(len(dense)))  # the first layers dense, then MoE
    if family in ("mixtral", "gpt_oss"):
        want["moe.router.normalize"] = router.normalize
    if family in ("mixtral", "olmoe", "gpt_oss"):
        want["moe.experts.d_ff"] = first.experts.d_ff == m.d_ff
    _refuse_first(want, family)
    config = {
        "architectures": [_ARCHITECTURES[family]], "model_type": family, "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tied_embeddings, "num_experts_per_tok": router.experts_per_token, "torch_dtype": "float32",
    }  # fmt: skip
    if hasattr(router, "aux_loss_coef"):
        config["router_aux_loss_coef"] = router.aux_loss_coef
    if family in ("mixtral", "gpt_oss"):
        config |= {"num_local_experts": first.experts.count, "sliding_window": None}
    elif not deepseek:
        config |= {"num_experts": first.experts.count, "norm_topk_prob": router.normalize}
    if family in ("qwen2_moe", "qwen3_moe"):
        config |= {"moe_intermediate_size": first.experts.d_ff, "decoder_sparse_step": 1, "mlp_only_layers": dense,
                   "use_sliding_window": False, "attention_bias": False}  # fmt: skip
    if family == "qwen2_moe":
        config |= {"shared_expert_intermediate_size": first.experts.shared_d_ff, "qkv_bias": True}
    if family == "olmoe":
        config |= {"clip_qkv": None, "attention_bias": False}
    if oss:  # windows per layer; YaRN off: moespec's RoPE is plain
        config |= {"attention_bias": m.qkv_bias, "swiglu_limit": 7.0, "swiglu_alpha": 1.702, "sliding_window": m.window or m.seq_len,
                   "layer_types": ["sliding_attention" if i in m.window_layers else "full_attention" for i in range(m.n_layers)]}  # fmt: skip
    if deepseek:  # RoPE rows in moespec's rotate-half layout: rope_interleave false
        a = m.mla
        config |= {"q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
                   "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim, "head_dim": a.qk_rope_head_dim,
                   "rope_interleave": False, "attention_bias": False, "n_routed_experts": first.experts.count,
                   "n_shared_experts": first.experts.shared_count, "moe_intermediate_size": first.experts.d_ff,
                   "first_k_dense_replace": len(dense), "n_group": router.n_groups, "topk_group": router.topk_groups,
                   "norm_topk_prob": router.normalize, "routed_scaling_factor": router.scaling_factor}  # fmt: skip
    return config


def _refuse_first(checks: dict[str, bool], family: str) -> None:
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"{key}: the spec's value has no place in a {family} config; export to another family or change the spec")
