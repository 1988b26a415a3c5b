"""Readers of the Hugging Face MoE families with their own attention or routing: Llama-4
(NoPE, L2 QK-norm, input gating), ERNIE-4.5 (a frozen selection bias), gpt-oss (sinks,
windows, expert biases, clamped SwiGLU), and DeepSeek's MoE on MLA (DeepSeek-V2/V3) or on
standard attention (GLM-4.5, dots.llm1). hf_config.py holds the shared reader and the rest.
"""

from __future__ import annotations

from moespec.interop.hf_config import _model, _moe, _placement, _Reader, _topk


def llama4(r, seq):
    """Llama-4 text: MoE every `interleave_moe_layer_step` layers with a shared expert, top-1
    sigmoid routing that scales the expert's input, a weightless QK-norm after RoPE in the
    RoPE layers, and NoPE layers (`no_rope_layers` flags 0). Chunked attention and the NoPE
    layers' temperature tuning change nothing below their lengths and are refused above."""
    bias = bool(r.take("attention_bias", False))
    kinds = r.take("layer_types") or []
    chunk = r.take("attention_chunk_size")
    if set(kinds) - {"chunked_attention", "full_attention"}:
        r.refuse("layer_types", f"attention kinds {sorted(set(kinds) - {'chunked_attention', 'full_attention'})} are not expressible")
    if chunk and int(chunk) < seq and (not kinds or "chunked_attention" in kinds):
        r.refuse("attention_chunk_size", f"{chunk}: chunked attention shorter than the training length {seq} is not expressible (import with --seq-len {chunk} or less)")
    floor = int(r.take("floor_scale", 8192) or 8192)
    r.take("attn_scale")
    if r.take("attn_temperature_tuning") and seq >= floor:
        r.refuse("attn_temperature_tuning", f"the NoPE layers' temperature grows from position {floor} on, within the training length {seq}; import with --seq-len {floor - 1} or less")
    qk_norm = "l2" if r.take("use_qk_norm") else "none"
    model = _model(r, seq, qkv_bias=bias, out_bias=bias, qk_norm=qk_norm, also=("chunked_attention",))
    model["d_ff"] = r.take("intermediate_size_mlp", required=True)  # the dense layers' width
    n = model["n_layers"]
    flags = r.take("no_rope_layers")
    interval = int(r.take("no_rope_layer_interval", 4) or 4)
    flags = flags if flags else [int((i + 1) % interval != 0) for i in range(n)]  # transformers' default
    nope = [i for i, use in enumerate(flags) if not use]
    if nope:
        model["nope_layers"] = nope
    step = int(r.take("interleave_moe_layer_step", 1) or 1)
    layers = r.take("moe_layers") or list(range(step - 1, n, step))
    r.note("rope_scaling", "Llama-4's llama3 RoPE scaling: not applied (changes positions beyond the pretraining length, no parameter)")
    router = {"type": "sigmoid_bias", "k": int(r.take("num_experts_per_tok", 1)), "normalize": False, "bias_update_rate": 0.0}
    r.take("router_aux_loss_coef")
    moe = _moe(_placement(n, layers), r.take("num_local_experts", required=True), r.take("intermediate_size"), router,
               shared_count=1, shared_d_ff=int(r.config["intermediate_size"]), gate_input=True)  # fmt: skip
    return model, moe


def ernie(r, seq):
    """ERNIE-4.5-MoE: softmax top-k chosen with a frozen per-expert correction
    (`moe_statics.e_score_correction_bias`) and renormalised, shared experts, MoE layers
    from `moe_layer_start_index` to `moe_layer_end_index` every `moe_layer_interval`."""
    if r.take("use_bias"):
        r.refuse("use_bias", "biases on ERNIE's MLP projections are not expressible yet")
    model = _model(r, seq)
    n = model["n_layers"]
    start, end = int(r.take("moe_layer_start_index", 0) or 0), r.take("moe_layer_end_index", -1)
    end = n - 1 if end in (None, -1) else int(end)
    interval = int(r.take("moe_layer_interval", 1) or 1)
    layers = [i for i in range(n) if (i + 1) % interval == 0 and start <= i <= end]
    r.note("moe_norm_min", "a floor on the renormalising sum of the top-k probabilities; moespec divides by the sum (it is never near 0)")
    count = r.take("moe_num_experts") or r.take("num_experts", required=True)
    k = r.take("moe_k") or r.take("num_experts_per_tok", 6)
    router = _topk(r, k, normalize=True) | {"selection_bias": True}
    shared = int(r.take("moe_num_shared_experts", 0) or 0)
    experts = {"shared_count": shared, "shared_d_ff": int(r.config["moe_intermediate_size"])} if shared else {}
    return model, _moe(_placement(n, layers), count, r.take("moe_intermediate_size", required=True), router, **experts)


def gpt_oss(r, seq):
    """gpt-oss: attention sinks, alternating sliding windows, biases everywhere, the clamped
    SwiGLU, softmax over the top-k router logits (= renormalised top-k softmax)."""
    limit, alpha = float(r.take("swiglu_limit", 7.0)), float(r.take("swiglu_alpha", 1.702))
    if (limit, alpha) != (7.0, 1.702):
        r.refuse("swiglu_limit", f"swiglu_clamped is gpt-oss's (limit 7, alpha 1.702); ({limit:g}, {alpha:g}) is not expressible")
    bias = bool(r.take("attention_bias", True))
    model = _model(r, seq, qkv_bias=bias, out_bias=bias, attention_sinks=True)
    model["activation"] = "swiglu_clamped"
    router = _topk(r, r.take("num_experts_per_tok", 4), normalize=True) | {"bias": True}
    return model, _moe({"type": "all"}, r.take("num_local_experts", required=True), model["d_ff"], router, bias=True)


def _deepseek_style(r, seq, *, qk_norm: str = "none", bias: bool = False, out_bias: bool = False, router: dict | None = None, **model_extra):
    """DeepSeek's MoE (sigmoid scores with a selection bias, expert groups, shared experts,
    the first layers dense): on standard attention in GLM-4.5 and dots.llm1, on MLA in
    DeepSeek-V2/V3 (`model_extra`), with a softmax router in V2 (`router`)."""
    model = _model(r, seq, qkv_bias=bias, out_bias=out_bias, qk_norm=qk_norm, **model_extra)
    first = int(r.take("first_k_dense_replace", 0) or 0)
    freq = int(r.take("moe_layer_freq", 1) or 1)  # DeepSeek-V2: layer i >= first is MoE when i % freq == 0
    r.note("num_nextn_predict_layers", "multi-token-prediction layers: not built by Hugging Face's model either, not counted")
    if router is None:
        r.note("scoring_func", "sigmoid scores with a selection bias, as the sigmoid_bias router")
        r.note("topk_method", "group-limited top-k, as the sigmoid_bias router")
        router = {"type": "sigmoid_bias", "k": int(r.take("num_experts_per_tok", 8)), "n_groups": int(r.take("n_group", 1) or 1),
                  "topk_groups": int(r.take("topk_group", 1) or 1), "normalize": bool(r.take("norm_topk_prob", True)),
                  "scaling_factor": float(r.take("routed_scaling_factor", 1.0) or 1.0)}  # fmt: skip
    shared = int(r.take("n_shared_experts", 0) or 0)
    experts = {"shared_count": shared, "shared_d_ff": int(r.config["moe_intermediate_size"])} if shared else {}
    layers = [i for i in range(first, model["n_layers"]) if i % freq == 0]
    return model, _moe(_placement(model["n_layers"], layers), r.take("n_routed_experts", required=True),
                       r.take("moe_intermediate_size", required=True), router, **experts)  # fmt: skip


def _mla(r: _Reader) -> dict:
    """DeepSeek's latent attention. Its checkpoints lay RoPE channels out in interleaved
    pairs; moespec rotates halves, and `compile --weights` permutes those rows on load."""
    if r.take("attention_bias"):
        r.refuse("attention_bias", "biases on MLA's q_a/kv_a projections are not expressible yet")
    r.take("head_dim"), r.take("qk_head_dim")  # transformers derives them (rope width, nope + rope); MLA's widths say it all
    r.note("rope_interleave", "interleaved RoPE pairs: moespec rotates halves; weights are permuted on load, so the model is the same")
    params = r.config.get("rope_parameters") or r.config.get("rope_scaling") or {}
    if params.get("mscale_all_dim"):
        r.notes.append("rope scaling yarn mscale_all_dim: scales attention logits beyond the pretraining length; not applied (no parameter)")
    return {"mla": {"q_lora_rank": r.take("q_lora_rank"), "kv_lora_rank": r.take("kv_lora_rank", required=True),
                    "qk_nope_head_dim": r.take("qk_nope_head_dim", required=True), "qk_rope_head_dim": r.take("qk_rope_head_dim", required=True),
                    "v_head_dim": r.take("v_head_dim", required=True)}}  # fmt: skip


def deepseek_v3(r, seq):
    model, moe = _deepseek_style(r, seq, **_mla(r))
    model.pop("n_kv_heads", None), model.pop("head_dim", None)  # MLA sets both
    return model, moe


def deepseek_v2(r, seq):
    method = r.take("topk_method", "greedy")
    if method != "greedy":
        r.refuse("topk_method", f"{method!r}: DeepSeek-V2's group-limited softmax routing is not expressible (moespec groups sigmoid_bias routing)")
    if float(r.take("routed_scaling_factor", 1.0) or 1.0) != 1.0:
        r.refuse("routed_scaling_factor", "a scale on softmax top-k gates is not expressible (only the sigmoid_bias router scales)")
    if r.take("scoring_func", "softmax") != "softmax":
        r.refuse("scoring_func", "DeepSeek-V2 scores other than softmax are not expressible")
    r.take("n_group"), r.take("topk_group")
    r.note("seq_aux", "sequence-level auxiliary loss: moespec balances per micro-batch (no parameter)")
    router = {"type": "topk", "k": int(r.take("num_experts_per_tok", 6)), "normalize": bool(r.take("norm_topk_prob", False)),
              "aux_loss_coef": float(r.take("aux_loss_alpha", 0.001) or 0.0)}  # fmt: skip
    model, moe = _deepseek_style(r, seq, router=router, **_mla(r))
    model.pop("n_kv_heads", None), model.pop("head_dim", None)  # MLA sets both
    return model, moe


def glm4_moe(r, seq):
    bias = bool(r.take("attention_bias", False))
    factor = r.take("partial_rotary_factor") or (r.config.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0
    extra = {"rope_fraction": float(factor)} if float(factor) != 1.0 else {}
    return _deepseek_style(r, seq, qk_norm="per_head" if r.take("use_qk_norm", False) else "none", bias=bias, out_bias=False, **extra)


def dots1(r, seq):
    bias = bool(r.take("attention_bias", False))
    return _deepseek_style(r, seq, qk_norm="per_head", bias=bias, out_bias=bias)
