"""Export configs of the families whose shape is close to one already exported: GLM-4.5 and
dots.llm1 (DeepSeek's routing on standard attention), Phi-3.5-MoE (Mixtral's layout with
LayerNorm, biases and SparseMixer routing), DBRX (its own names) and Granite-MoE (fused
banks). Each checks what the family can hold and names the first spec key it cannot; the
weights' names are hf_weights.from_moespec's.
"""

from __future__ import annotations


def _refuse_first(checks: dict[str, bool], family: str) -> None:
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"{key}: the spec's value has no place in a {family} config; export to another family or change the spec")


def _common(plan, family: str, *, activation: str = "swiglu", norm: str = "rmsnorm", qk_norm=("none",), qkv_bias=(False,),
            out_bias=(False,), router: tuple[str, ...] = ("topk",), shared: bool = False, nope: bool = False,
            selection_bias: bool = False, gate_input: bool = False, mla: bool = False) -> None:  # fmt: skip
    """The checks every one of these families shares (the values each may take)."""
    m, layers = plan.model, plan.moe_layers
    first = layers[0].moe
    _refuse_first({
        "model.encoder": m.encoder is None, "model.host": m.host == "transformer", "model.activation": m.activation == activation,
        "model.norm": m.norm == norm, "model.positions": m.positions == "rope", "model.dropout": m.dropout == 0.0,
        "model.mla": mla or m.mla is None, "model.attention_sinks": not m.attention_sinks, "model.sliding_window": m.window is None,
        "model.nope_layers": nope or not m.nope_layers, "model.qk_norm": m.qk_norm in qk_norm, "model.qkv_bias": m.qkv_bias in qkv_bias,
        "model.out_bias": m.out_bias in out_bias, "moe.overrides": all(layer.moe == first for layer in layers),
        "moe.experts.bias": not first.experts.bias, "moe.experts.gate_input": gate_input or not first.experts.gate_input,
        "moe.router.type": first.router.type in router, "moe.router.selection_bias": selection_bias or not getattr(first.router, "selection_bias", False),
        "moe.router.bias": not getattr(first.router, "bias", False), "moe.capacity": first.capacity is None or first.capacity.dropless,
        "moe.experts.shared_count": first.experts.shared_count == 0 or (shared and not first.experts.shared_gate),
    }, family)  # fmt: skip


def _base(plan, architecture: str, family: str) -> dict:
    m = plan.model
    return {"architectures": [architecture], "model_type": family, "vocab_size": m.vocab_size, "hidden_size": m.d_model,
            "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, "max_position_embeddings": m.seq_len,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "tie_word_embeddings": m.tied_embeddings,
            "torch_dtype": "float32"}  # fmt: skip


def deepseek_like(plan, family: str) -> dict:
    """glm4_moe, dots1: the first layers dense, then MoE with DeepSeek's router and shared experts."""
    m, first = plan.model, plan.moe_layers[0].moe
    glm = family == "glm4_moe"
    _common(plan, family, qk_norm=("none", "per_head") if glm else ("per_head",), qkv_bias=(m.qkv_bias,),
            out_bias=(False,) if glm else (m.qkv_bias,), router=("sigmoid_bias",), shared=True)  # fmt: skip
    dense = [layer.index for layer in plan.layers if layer.moe is None]
    _refuse_first({"moe.placement": dense == list(range(len(dense))),
                   "moe.experts.shared_d_ff": not first.experts.shared_count or first.experts.shared_d_ff == first.experts.d_ff,
                   "model.rope_fraction": glm or m.rope_fraction == 1.0}, family)  # fmt: skip
    r = first.router
    config = _base(plan, "Glm4MoeForCausalLM" if glm else "Dots1ForCausalLM", family) | {
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps, "attention_bias": m.qkv_bias, "n_routed_experts": first.experts.count,
        "n_shared_experts": first.experts.shared_count, "num_experts_per_tok": r.k, "moe_intermediate_size": first.experts.d_ff,
        "first_k_dense_replace": len(dense), "n_group": r.n_groups, "topk_group": r.topk_groups, "norm_topk_prob": r.normalize,
        "routed_scaling_factor": r.scaling_factor}  # fmt: skip
    if glm:
        config |= {"partial_rotary_factor": m.rope_fraction, "use_qk_norm": m.qk_norm == "per_head"}
        config["rope_parameters"]["partial_rotary_factor"] = m.rope_fraction
    return config


def phimoe(plan) -> dict:
    m, first = plan.model, plan.moe_layers[0].moe
    _common(plan, "phimoe", norm="layernorm", qkv_bias=(m.out_bias,), out_bias=(m.qkv_bias,), router=("sparsemixer",))
    _refuse_first({"moe.placement": all(layer.moe is not None for layer in plan.layers), "moe.experts.d_ff": first.experts.d_ff == m.d_ff,
                   "model.norm_bias": m.norm_bias, "moe.router.k": first.router.k == 2}, "phimoe")  # fmt: skip
    return _base(plan, "PhimoeForCausalLM", "phimoe") | {
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps, "attention_bias": m.qkv_bias, "lm_head_bias": m.lm_head_bias,
        "num_local_experts": first.experts.count, "num_experts_per_tok": 2, "router_jitter_noise": first.router.jitter_eps,
        "input_jitter_noise": 0.0, "router_aux_loss_coef": first.router.aux_loss_coef, "sliding_window": None}  # fmt: skip


def dbrx(plan) -> dict:
    m, first = plan.model, plan.moe_layers[0].moe
    _common(plan, "dbrx", norm="layernorm")
    _refuse_first({"model.norm_bias": not m.norm_bias, "moe.placement": all(layer.moe is not None for layer in plan.layers),
                   "model.head_dim": m.head_dim * m.n_heads == m.d_model, "model.lm_head_bias": not m.lm_head_bias}, "dbrx")  # fmt: skip
    r = first.router
    return {"architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": m.d_model, "n_heads": m.n_heads, "n_layers": m.n_layers,
            "max_seq_len": m.seq_len, "vocab_size": m.vocab_size, "tie_word_embeddings": m.tied_embeddings, "torch_dtype": "float32",
            "attn_config": {"kv_n_heads": m.n_kv_heads, "rope_theta": m.rope_theta, "clip_qkv": 1.0e30},  # transformers 5 needs a bound: one never reached
            "ffn_config": {"ffn_hidden_size": first.experts.d_ff, "moe_num_experts": first.experts.count, "moe_top_k": r.k,
                           "moe_normalize_expert_weights": 1.0 if r.normalize else None, "moe_loss_weight": r.aux_loss_coef,
                           "moe_jitter_eps": None}}  # fmt: skip


def granitemoe(plan) -> dict:
    m, first = plan.model, plan.moe_layers[0].moe
    _common(plan, "granitemoe", qkv_bias=(m.out_bias,), out_bias=(m.qkv_bias,), router=("topk",))
    _refuse_first({"moe.placement": all(layer.moe is not None for layer in plan.layers), "moe.experts.d_ff": first.experts.d_ff == m.d_ff,
                   "moe.router.normalize": first.router.normalize, "model.lm_head_bias": not m.lm_head_bias}, "granitemoe")  # fmt: skip
    return _base(plan, "GraniteMoeForCausalLM", "granitemoe") | {
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps, "attention_bias": m.qkv_bias, "num_local_experts": first.experts.count,
        "num_experts_per_tok": first.router.k, "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
        "attention_multiplier": m.head_dim**-0.5, "router_aux_loss_coef": first.router.aux_loss_coef}  # fmt: skip


def ernie4_5_moe(plan) -> dict:
    """ERNIE-4.5: top-k chosen with a frozen correction (router.selection_bias), renormalised;
    shared experts as one MLP; MoE in a contiguous run of layers every `interval`."""
    m, first = plan.model, plan.moe_layers[0].moe
    _common(plan, "ernie4_5_moe", router=("topk",), shared=True, selection_bias=True)
    moe = [layer.index for layer in plan.moe_layers]
    interval = moe[1] - moe[0] if len(moe) > 1 else 1
    start, end = moe[0], moe[-1]
    r = first.router
    _refuse_first({"moe.placement": moe == [i for i in range(m.n_layers) if (i + 1) % interval == 0 and start <= i <= end],
                   "moe.router.selection_bias": r.selection_bias, "moe.router.normalize": r.normalize,
                   "moe.experts.shared_d_ff": not first.experts.shared_count or first.experts.shared_d_ff == first.experts.d_ff,
                   "model.rope_fraction": m.rope_fraction == 1.0}, "ernie4_5_moe")  # fmt: skip
    return _base(plan, "Ernie4_5_MoeForCausalLM", "ernie4_5_moe") | {
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps, "use_bias": False, "moe_num_experts": first.experts.count, "moe_k": r.k,
        "moe_intermediate_size": first.experts.d_ff, "moe_num_shared_experts": first.experts.shared_count,
        "moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": interval, "moe_norm_min": 1e-12,
        "router_aux_loss_coef": r.aux_loss_coef}  # fmt: skip


def llama4_text(plan) -> dict:
    """Llama-4 text: MoE every `interleave_moe_layer_step` layers, top-1 sigmoid gates scaling
    the expert's input, one shared expert, L2 QK-norm in the RoPE layers, NoPE layers."""
    m, first = plan.model, plan.moe_layers[0].moe
    _common(plan, "llama4_text", qk_norm=("none", "l2"), router=("sigmoid_bias",), shared=True, nope=True, gate_input=True)
    moe = [layer.index for layer in plan.moe_layers]
    step = moe[1] - moe[0] if len(moe) > 1 else moe[0] + 1
    r = first.router
    _refuse_first({"moe.placement": moe == list(range(step - 1, m.n_layers, step)),
                   "moe.experts.gate_input": first.experts.gate_input, "moe.router.k": r.k == 1 and r.n_groups == 1,
                   "moe.router.normalize": not r.normalize and r.scaling_factor == 1.0,
                   "moe.experts.shared_count": first.experts.shared_count == 1 and first.experts.shared_d_ff == first.experts.d_ff,
                   "model.rope_fraction": m.rope_fraction == 1.0, "model.lm_head_bias": not m.lm_head_bias}, "llama4_text")  # fmt: skip
    return _base(plan, "Llama4ForCausalLM", "llama4_text") | {
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps, "attention_bias": m.qkv_bias, "intermediate_size": first.experts.d_ff,
        "intermediate_size_mlp": m.d_ff, "num_local_experts": first.experts.count, "num_experts_per_tok": 1,
        "interleave_moe_layer_step": step, "use_qk_norm": m.qk_norm == "l2", "no_rope_layers": [int(i not in m.nope_layers) for i in range(m.n_layers)],
        "attn_temperature_tuning": False, "rope_scaling": None, "attention_chunk_size": m.seq_len * 2,
        "router_aux_loss_coef": 0.0}  # fmt: skip


def deepseek_v2(plan) -> dict:
    """DeepSeek-V2 (and V2-Lite): MLA, softmax top-k ("greedy"), shared experts, the first
    layers dense. Its checkpoints pair RoPE channels interleaved: hf_weights re-interleaves."""
    m, first = plan.model, plan.moe_layers[0].moe
    _common(plan, "deepseek_v2", router=("topk",), shared=True, mla=True)
    dense = [layer.index for layer in plan.layers if layer.moe is None]
    _refuse_first({"model.mla": m.mla is not None, "moe.placement": dense == list(range(len(dense))),
                   "moe.experts.shared_d_ff": not first.experts.shared_count or first.experts.shared_d_ff == first.experts.d_ff,
                   "model.qkv_bias": not m.qkv_bias, "model.out_bias": not m.out_bias}, "deepseek_v2")  # fmt: skip
    a, r = m.mla, first.router
    config = _base(plan, "DeepseekV2ForCausalLM", "deepseek_v2") | {
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps, "attention_bias": False, "q_lora_rank": a.q_lora_rank,
        "kv_lora_rank": a.kv_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim, "head_dim": a.qk_rope_head_dim, "n_routed_experts": first.experts.count,
        "n_shared_experts": first.experts.shared_count, "moe_intermediate_size": first.experts.d_ff, "num_experts_per_tok": r.k,
        "first_k_dense_replace": len(dense), "moe_layer_freq": 1, "topk_method": "greedy", "scoring_func": "softmax",
        "routed_scaling_factor": 1.0, "norm_topk_prob": r.normalize, "aux_loss_alpha": r.aux_loss_coef, "n_group": 1, "topk_group": 1}  # fmt: skip
    config["num_key_value_heads"] = m.n_heads
    return config
