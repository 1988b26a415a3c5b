"""A Hugging Face `config.json` turned into a moespec spec whose parameter count is the HF model's.

Why a table of families rather than one generic reader: every family names the same idea
differently (`num_local_experts`, `num_experts`, `n_routed_experts`, `moe_num_experts`) and
places MoE layers by its own rule (`decoder_sparse_step` + `mlp_only_layers`,
`first_k_dense_replace`, `interleave_moe_layer_step`). Each reader below states its rule.

Every field of a config ends in one of three places:
- mapped: it becomes a spec key (widths, counts, biases, norms, router, placement);
- listed: it changes nothing countable (muP multipliers, router jitter, RoPE scaling, L2
  QK-norm without weights) or is a runtime difference moespec states rather than hides; each
  becomes a note the CLI prints and writes into the spec's header;
- refused: it changes the architecture in a way the spec language cannot express (MLA,
  attention sinks, encoder-decoder, windowed attention shorter than the training length):
  `UnsupportedConfig`, one line naming the field.
Fields no reader knows are listed as unrecognised, never dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Fields of every HF config that describe tokens, serialisation or inference, not the model's
# shape or what it computes in training.
HARMLESS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "output_router_logits", "attention_dropout",
    "max_position_embeddings", "_name_or_path", "auto_map", "quantization_config", "tokenizer_class",
    "return_dict", "output_hidden_states", "output_attentions", "is_encoder_decoder", "pretraining_tp",
    "use_return_dict", "torchscript", "id2label", "label2id", "chunk_size_feed_forward", "tie_encoder_decoder",
    "hidden_act", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_parameters", "tie_word_embeddings",
    "router_aux_loss_coef", "num_experts_per_tok", "rope_scaling", "max_seq_len", "mlp_bias", "qkv_bias",
}  # fmt: skip
DEFAULT_SEQ_LEN = 4096  # the training length when neither the user nor the config says less


class UnsupportedConfig(ValueError):
    """A field that changes the architecture in a way the spec language cannot express."""


@dataclass
class Imported:
    family: str  # the config's model_type
    spec: dict  # a spec document (version 1), ready for YAML
    notes: list[str] = field(default_factory=list)  # listed fields: what they mean for the import


def read_config(path: Path) -> dict:
    """A config.json (a file, or a directory holding one) as a dict; ValueError in one line."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no such file" if not path.is_dir() else f"{path}: no config.json in this directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file}: not a text file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: a config.json is one JSON object, got {type(data).__name__}")
    if data.get("text_config") and isinstance(data["text_config"], dict) and "model_type" in data["text_config"]:
        return data["text_config"]  # multimodal wrappers (Llama-4): the text model is what moespec builds
    return data


class _Reader:
    """Reads one config: `take` marks a field mapped, `note` lists one, `refuse` raises."""

    def __init__(self, config: dict):
        self.config = config
        self.used: set[str] = set()
        self.notes: list[str] = []

    def take(self, key: str, default=None, *, required: bool = False):
        self.used.add(key)
        if key not in self.config or self.config[key] is None:
            if required:
                raise UnsupportedConfig(f"{key}: missing from the config; a {self.config.get('model_type')} config needs it")
            return default
        return self.config[key]

    def note(self, key: str, text: str) -> None:
        self.used.add(key)
        if key in self.config:
            self.notes.append(f"{key}: {text}")

    def refuse(self, key: str, why: str) -> None:
        raise UnsupportedConfig(f"{key}: {why}")

    def leftovers(self) -> None:
        for key in sorted(set(self.config) - self.used - HARMLESS):
            self.notes.append(f"{key}: unrecognised field, not imported (check that it changes nothing you rely on)")


def _activation(r: _Reader, key: str = "hidden_act") -> str:
    act = r.take(key, "silu")
    if act in ("silu", "swish"):
        return "swiglu"
    if act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return "geglu"
    r.refuse(key, f"{act!r} gated MLPs are not expressible (moespec has swiglu and geglu)")


def _rope_theta(r: _Reader) -> float:
    params = r.take("rope_parameters") or {}
    scaling = r.take("rope_scaling") or {}
    kind = (params or {}).get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind not in (None, "default"):
        r.notes.append(f"rope scaling {kind!r}: not applied (changes positions beyond the training length, no parameter)")
    theta = r.take("rope_theta") or (params or {}).get("rope_theta") or 10000.0
    return float(theta)


def _seq_len(r: _Reader, seq_len: int | None, *, max_key: str = "max_position_embeddings") -> int:
    top = r.config.get(max_key) or DEFAULT_SEQ_LEN
    return int(seq_len) if seq_len else min(int(top), DEFAULT_SEQ_LEN)


def _window(r: _Reader, n_layers: int, *, on: bool = True, also: tuple[str, ...] = ()) -> dict | None:
    """Sliding-window attention as HF runs it, as `model.sliding_window` (None: none).
    transformers 5 writes `layer_types` (the "sliding_attention" layers use the window);
    without it, `on` says whether the family windows every layer (Mixtral, Phi-3.5-MoE) and
    Qwen windows the layers from `max_window_layers` on when `use_sliding_window` is set."""
    window = r.take("sliding_window")
    use = r.take("use_sliding_window")
    first = r.take("max_window_layers")
    kinds = r.take("layer_types")
    if kinds is not None:
        unknown = sorted(set(kinds) - {"full_attention", "sliding_attention", *also})  # `also`: kinds the family's reader handled
        if unknown:
            r.refuse("layer_types", f"attention kinds {unknown} are not expressible")
        layers = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    elif use is not None:  # Qwen
        layers = list(range(int(first or 0), n_layers)) if use else []
    else:
        layers = list(range(n_layers)) if on else []
    if not window or not layers:
        return None
    return {"size": int(window)} if layers == list(range(n_layers)) else {"size": int(window), "layers": layers}


def _placement(n_layers: int, moe: list[int]) -> dict:
    """The shortest spec placement naming exactly the layers in `moe`."""
    moe = sorted(moe)
    if not moe:
        raise UnsupportedConfig("the config describes no MoE layer (moespec specs have at least one)")
    first = moe[0]
    if moe == list(range(first, n_layers)):
        return {"type": "all", **({"first_dense": first} if first else {})}
    if len(moe) > 1:
        step = moe[1] - moe[0]
        if step > 1 and moe == list(range(first, n_layers, step)):
            return {"type": "every", "every": step, "offset": first}
    return {"type": "layers", "layers": moe}


def _model(r: _Reader, seq: int, *, window: bool = False, also: tuple[str, ...] = (), **extra) -> dict:
    """The `model` section shared by the Llama-like families; `window`: whether the family
    applies `sliding_window` to every layer when `layer_types` does not say."""
    d, heads = r.take("hidden_size", required=True), r.take("num_attention_heads", required=True)
    sliding = _window(r, int(r.config.get("num_hidden_layers") or 0), on=window, also=also)
    model = {
        "vocab_size": r.take("vocab_size", required=True), "d_model": d, "n_layers": r.take("num_hidden_layers", required=True),
        "n_heads": heads, "n_kv_heads": r.take("num_key_value_heads") or heads,
        "d_ff": r.take("intermediate_size", required=True), "activation": _activation(r), "norm": "rmsnorm",
        "norm_eps": float(r.take("rms_norm_eps", 1e-6)), "positions": "rope", "rope_theta": _rope_theta(r),
        "tied_embeddings": bool(r.take("tie_word_embeddings", False)), "seq_len": seq,
    }  # fmt: skip
    head_dim = r.take("head_dim")
    if head_dim and (d % heads or head_dim != d // heads):
        model["head_dim"] = head_dim
    if r.take("mlp_bias"):
        r.refuse("mlp_bias", "biases on the FFN projections are not expressible yet")
    if sliding is not None:
        model["sliding_window"] = sliding
    return model | extra


def _topk(r: _Reader, k: int, *, normalize: bool) -> dict:
    return {"type": "topk", "k": int(k), "normalize": bool(normalize), "aux_loss_coef": float(r.take("router_aux_loss_coef", 0.0) or 0.0)}


def _moe(placement: dict, count: int, d_ff: int, router: dict, **experts) -> dict:
    return {"placement": placement, "experts": {"count": int(count), "d_ff": int(d_ff), **experts}, "router": router, "capacity": {"dropless": True}}


def _sparse_step_layers(r: _Reader, n_layers: int) -> list[int]:
    """Qwen-MoE's rule: layer i is MoE when (i + 1) % decoder_sparse_step == 0 and i is not
    in mlp_only_layers."""
    step = int(r.take("decoder_sparse_step", 1) or 1)
    dense = set(r.take("mlp_only_layers", []) or [])
    return [i for i in range(n_layers) if (i + 1) % step == 0 and i not in dense]


def _mixtral(r, seq):
    model = _model(r, seq, window=True)
    r.note("router_jitter_noise", "training-time multiplicative jitter on the router input; not applied (no parameter)")
    moe = _moe({"type": "all"}, r.take("num_local_experts", required=True), model["d_ff"], _topk(r, r.take("num_experts_per_tok", 2), normalize=True))
    return model, moe


def _qwen_moe(r, seq, *, qwen3: bool):
    bias = bool(r.take("attention_bias", False))
    extra = {"qkv_bias": bool(r.take("qkv_bias", True))} if not qwen3 else {"qkv_bias": bias, "out_bias": bias, "qk_norm": "per_head"}
    model = _model(r, seq, window=bool(r.config.get("use_sliding_window")), **extra)
    layers = _sparse_step_layers(r, model["n_layers"])
    router = _topk(r, r.take("num_experts_per_tok", 4), normalize=r.take("norm_topk_prob", False))
    experts = {}
    shared = r.take("shared_expert_intermediate_size")
    if shared:
        experts = {"shared_count": 1, "shared_d_ff": int(shared), "shared_gate": True}
    count = r.take("num_experts") or r.take("num_local_experts", required=True)  # transformers 5 writes the latter
    return model, _moe(_placement(model["n_layers"], layers), count, r.take("moe_intermediate_size", required=True), router, **experts)


def _olmoe(r, seq):
    bias = bool(r.take("attention_bias", False))
    if r.take("clip_qkv") is not None:
        r.refuse("clip_qkv", "clamping q, k, v is not expressible yet")
    model = _model(r, seq, qkv_bias=bias, out_bias=bias, qk_norm="full")
    router = _topk(r, r.take("num_experts_per_tok", 8), normalize=r.take("norm_topk_prob", False))
    return model, _moe({"type": "all"}, r.take("num_experts", required=True), model["d_ff"], router)


def _granite(r, seq):
    bias = bool(r.take("attention_bias", False))
    model = _model(r, seq, qkv_bias=bias, out_bias=bias)
    for key in ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier"):
        r.note(key, "muP multiplier: scales activations, no parameter; not applied (moespec trains with standard parametrisation)")
    router = _topk(r, r.take("num_experts_per_tok", 8), normalize=True)  # softmax over the top-k logits
    experts = {}
    shared = r.take("shared_intermediate_size")
    if shared:
        experts = {"shared_count": 1, "shared_d_ff": int(shared)}
    return model, _moe({"type": "all"}, r.take("num_local_experts", required=True), model["d_ff"], router, **experts)


def _phimoe(r, seq):
    bias = bool(r.take("attention_bias", False))
    model = _model(r, seq, window=True, norm="layernorm", qkv_bias=bias, out_bias=bias, lm_head_bias=bool(r.take("lm_head_bias", False)))
    r.note("input_jitter_noise", "training-time input jitter; not applied (no parameter)")
    r.note("original_max_position_embeddings", "LongRoPE's base length; not applied (no parameter)")
    router = {"type": "sparsemixer", "k": int(r.take("num_experts_per_tok", 2)), "jitter_eps": float(r.take("router_jitter_noise", 0.01)),
              "aux_loss_coef": float(r.take("router_aux_loss_coef", 0.0) or 0.0)}  # SparseMixer-v2, its mask width from the jitter  # fmt: skip
    return model, _moe({"type": "all"}, r.take("num_local_experts", required=True), model["d_ff"], router)


def _dbrx(r, seq):
    attn, ffn = r.take("attn_config", {}) or {}, r.take("ffn_config", {}) or {}
    d, heads = r.take("d_model", required=True), r.take("n_heads", required=True)
    if attn.get("clip_qkv") is not None:
        r.notes.append(f"attn_config.clip_qkv: {attn['clip_qkv']} clamps q, k, v in DBRX; not applied (no parameter)")
    p = ffn.get("moe_normalize_expert_weights", 1)
    if p not in (None, 1, 1.0):
        r.refuse("ffn_config.moe_normalize_expert_weights", f"an L{p} renormalisation of the top-k gates is not expressible (moespec renormalises to sum 1, or not at all)")
    if ffn.get("moe_jitter_eps"):
        r.notes.append("ffn_config.moe_jitter_eps: training-time router jitter; not applied (no parameter)")
    if ffn.get("ffn_act_fn", {}).get("name", "silu") != "silu":
        r.refuse("ffn_config.ffn_act_fn", f"{ffn['ffn_act_fn']} is not expressible (moespec has swiglu and geglu)")
    seq = seq or DEFAULT_SEQ_LEN
    model = {
        "vocab_size": r.take("vocab_size", required=True), "d_model": d, "n_layers": r.take("n_layers", required=True),
        "n_heads": heads, "n_kv_heads": attn.get("kv_n_heads", heads), "d_ff": ffn["ffn_hidden_size"], "activation": "swiglu",
        "norm": "layernorm", "norm_bias": False, "norm_eps": 1e-5, "positions": "rope",
        "rope_theta": float(attn.get("rope_theta", 10000.0)), "tied_embeddings": bool(r.take("tie_word_embeddings", False)), "seq_len": seq,
    }  # fmt: skip
    router = {"type": "topk", "k": int(ffn.get("moe_top_k", 4)), "normalize": p is not None, "aux_loss_coef": float(ffn.get("moe_loss_weight", 0.01))}
    return model, _moe({"type": "all"}, ffn["moe_num_experts"], ffn["ffn_hidden_size"], router)


REFUSED: dict[str, tuple[str, str]] = {}  # families whose architecture the spec language cannot express yet: the field that says so



def _families() -> dict:
    """model_type -> reader. The readers of the families with their own attention or routing
    (DeepSeek's MLA, gpt-oss, Llama-4, ERNIE, GLM, dots) live in hf_families.py."""
    from moespec.interop import hf_families as f
    from moespec.interop.hf_switch import switch

    return {
        "mixtral": _mixtral,
        "qwen2_moe": lambda r, seq: _qwen_moe(r, seq, qwen3=False),
        "qwen3_moe": lambda r, seq: _qwen_moe(r, seq, qwen3=True),
        "olmoe": _olmoe,
        "granitemoe": _granite,
        "granitemoeshared": _granite,
        "phimoe": _phimoe,
        "dbrx": _dbrx,
        "llama4_text": f.llama4,
        "glm4_moe": f.glm4_moe,
        "dots1": f.dots1,
        "deepseek_v2": f.deepseek_v2,
        "deepseek_v3": f.deepseek_v3,
        "gpt_oss": f.gpt_oss,
        "ernie4_5_moe": f.ernie,
        "switch_transformers": switch,
    }


def import_config(config: dict, *, name: str | None = None, seq_len: int | None = None) -> Imported:
    """The spec of a Hugging Face config (see the module docstring for what is mapped,
    listed and refused). `seq_len`: the training length (default: the config's maximum,
    at most 4096)."""
    family = config.get("model_type")
    if family in REFUSED:
        key, why = REFUSED[family]
        raise UnsupportedConfig(f"{key}: {why} ({family})")
    families = _families()
    if family not in families:
        known = ", ".join(sorted(families))
        raise UnsupportedConfig(f"model_type: {family!r} is not a family moespec imports (it reads {known})")
    r = _Reader(config)
    seq = _seq_len(r, seq_len, max_key="max_seq_len" if family == "dbrx" else "max_position_embeddings")
    if family == "switch_transformers":
        seq = int(seq_len) if seq_len else 512  # the encoder's length: Switch pre-trained on 512 input tokens
    model, moe = families[family](r, seq)
    r.leftovers()
    spec = {
        "version": 1,
        "name": name or f"{family.replace('_', '-')}-import",
        "description": f"Imported from a Hugging Face {family} config by `moespec import`.",
        "model": model,
        "moe": moe,
        "parallelism": {"micro_batch": 1},
    }
    return Imported(family=family, spec=spec, notes=r.notes)

