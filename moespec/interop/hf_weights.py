"""Hugging Face safetensors checkpoints into a compiled moespec model, and back.

Why by name rules and not by family classes: the decoder families moespec imports share
Llama's names for everything but the MoE block, and differ there in a few spellings
(Mixtral's `block_sparse_moe.experts.N.w1/w2/w3`, Qwen's and OLMoE's `mlp.experts.N.
gate_proj/up_proj/down_proj`, Granite's fused `input_linear`/`output_linear`, Qwen's
`shared_expert`, DeepSeek-style `shared_experts`).
Checkpoints on the Hub and `save_pretrained` of transformers 5 store one tensor per expert;
transformers' runtime layout (`experts.gate_up_proj` [E, 2F, D], `experts.down_proj`
[E, D, F]) is read too. moespec keeps an expert bank as [E, D, F] / [E, F, D] (input dim
first, model/experts.py), so expert weights are transposed and stacked on the way in and
split on the way out. Every tensor must land somewhere and every parameter must be
filled: a checkpoint that does not fit the spec is a one-line error naming the tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

_LAYER = r"model\.layers\.(\d+)\."
# HF name (regex) -> moespec name (template); the expert rules are handled apart.
_RULES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.(weight|bias)", "final_norm.{0}"),
    (r"lm_head\.(weight|bias)", "lm_head.{0}"),
    (_LAYER + r"input_layernorm\.(weight|bias)", "blocks.{0}.attn_norm.{1}"),
    (_LAYER + r"post_attention_layernorm\.(weight|bias)", "blocks.{0}.ffn_norm.{1}"),
    (_LAYER + r"self_attn\.([qkvo]_proj)\.(weight|bias)", "blocks.{0}.attention.{1}.{2}"),
    (_LAYER + r"self_attn\.([qk]_norm)\.(weight|bias)", "blocks.{0}.attention.{1}.{2}"),
    (_LAYER + r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)\.(weight|bias)", "blocks.{0}.attention.{1}.{2}"),  # MLA
    (_LAYER + r"self_attn\.(q_a|kv_a)_layernorm\.(weight|bias)", "blocks.{0}.attention.{1}_norm.{2}"),
    (_LAYER + r"mlp\.(gate|up|down)_proj\.weight", "blocks.{0}.ffn.w_{1}.weight"),
    (_LAYER + r"(?:mlp|block_sparse_moe)\.gate\.weight", "blocks.{0}.moe.router.gate.weight"),
    (_LAYER + r"block_sparse_moe\.router\.layer\.weight", "blocks.{0}.moe.router.gate.weight"),  # Granite
    (_LAYER + r"mlp\.gate\.e_score_correction_bias", "blocks.{0}.moe.router.expert_bias_E"),
    (_LAYER + r"mlp\.(?:gate\.)?moe_statics\.e_score_correction_bias", "blocks.{0}.moe.router.selection_bias_E"),  # ERNIE, [1, E]
    (_LAYER + r"mlp\.shared_experts?\.(gate|up|down)_proj\.weight", "blocks.{0}.moe.shared.ffn.w_{1}.weight"),
    (_LAYER + r"mlp\.shared_expert_gate\.weight", "blocks.{0}.moe.shared.gate.weight"),
]
_RULES = [(re.compile(pattern + "$"), target) for pattern, target in _RULES]
_EXPERT = re.compile(_LAYER + r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# Fused banks: transformers' runtime layout, and Granite's checkpoints (input_linear [E, 2F, D], output_linear [E, D, F]).
_FUSED = re.compile(_LAYER + r"(?:mlp\.experts\.(gate_up_proj|down_proj)|block_sparse_moe\.(input_linear|output_linear)\.weight)$")
_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (one file or shards), by name."""
    from safetensors.torch import load_file

    directory = Path(directory)
    files = [directory] if directory.is_file() else sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{file}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    return tensors


# gpt-oss keeps its banks input-first, gate and up interleaved column by column (gate_up_proj
# [E, D, 2F], its bias [E, 2F], down_proj [E, F, D]), names its router `router`, and has sinks.
_GPT_OSS = re.compile(_LAYER + r"(?:mlp\.experts\.(gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias)|mlp\.router\.(weight|bias)|self_attn\.(sinks))$")


# Llama-4: `feed_forward` for both kinds of layer; its bank is input-first, gate then up halves.
_LLAMA4 = re.compile(_LAYER + r"feed_forward\.(?:experts\.(gate_up_proj|down_proj)|router\.(weight)|shared_expert\.(gate|up|down)_proj\.weight|(gate|up|down)_proj\.weight)$")


def _llama4(m: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    layer, bank, router, shared, dense = m.groups()
    block = f"blocks.{layer}."
    if bank == "gate_up_proj":
        gate, up = tensor.chunk(2, dim=-1)  # [E, D, F] each
        return {block + "moe.experts.w_gate": gate, block + "moe.experts.w_up": up}
    if bank == "down_proj":
        return {block + "moe.experts.w_down": tensor}
    if router:
        return {block + "moe.router.gate.weight": tensor}
    if shared:
        return {block + f"moe.shared.ffn.w_{shared}.weight": tensor}
    return {block + f"ffn.w_{dense}.weight": tensor}


def _gpt_oss(m: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    layer, bank, router, sinks = m.groups()
    block = f"blocks.{layer}."
    if sinks:
        return {block + "attention.sinks": tensor}
    if router:
        return {block + f"moe.router.gate.{router}": tensor}
    experts = block + "moe.experts."
    if bank == "gate_up_proj":
        return {experts + "w_gate": tensor[..., ::2], experts + "w_up": tensor[..., 1::2]}
    if bank == "gate_up_proj_bias":
        return {experts + "b_gate": tensor[..., ::2], experts + "b_up": tensor[..., 1::2]}
    return {experts + ("w_down" if bank == "down_proj" else "b_down"): tensor}


# DBRX: its own names, a fused Wqkv [D + 2*KV*hd, D], expert banks as [E*F, D] (w1 gate, v1 up, w2 down).
_DBRX = re.compile(r"transformer\.(?:wte\.weight|norm_f\.weight|blocks\.(\d+)\.(norm_attn_norm\.(?:norm_1|norm_2|attn\.Wqkv|attn\.out_proj)|"
                   r"ffn\.router\.layer|ffn\.experts\.mlp\.(?:w1|v1|w2))(?:\.weight)?)$")  # fmt: skip


def _dbrx(name: str, tensor: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    m = _DBRX.fullmatch(name)
    if name == "transformer.wte.weight":
        return {"tok_embeddings.weight": tensor}
    if name == "transformer.norm_f.weight":
        return {"final_norm.weight": tensor}
    layer, part = m.group(1), m.group(2)
    block = f"blocks.{layer}."
    if part.endswith("Wqkv"):
        attention = model.blocks[int(layer)].attention
        q, kv = attention.n_heads * attention.head_dim, attention.n_kv_heads * attention.head_dim
        wq, wk, wv = tensor.split([q, kv, kv], dim=0)
        return {block + "attention.q_proj.weight": wq, block + "attention.k_proj.weight": wk, block + "attention.v_proj.weight": wv}
    simple = {"norm_attn_norm.norm_1": "attn_norm.weight", "norm_attn_norm.norm_2": "ffn_norm.weight",
              "norm_attn_norm.attn.out_proj": "attention.o_proj.weight", "ffn.router.layer": "moe.router.gate.weight"}  # fmt: skip
    if part in simple:
        return {block + simple[part]: tensor}
    experts = model.blocks[int(layer)].moe.experts
    bank_EFD = tensor.reshape(-1, experts.w_down.shape[1], tensor.shape[-1])  # [E, F, D]
    return {block + "moe.experts." + {"mlp.w1": "w_gate", "mlp.v1": "w_up"}[part[len("ffn.experts."):]]: bank_EFD.transpose(1, 2)} \
        if not part.endswith("w2") else {block + "moe.experts.w_down": bank_EFD}  # fmt: skip


def to_moespec(tensors: dict[str, torch.Tensor], model: nn.Module, family: str | None = None) -> dict[str, torch.Tensor]:
    """HF names and layouts -> the model's state-dict names and layouts (`family`: the
    checkpoint's model_type, for the layouts only it uses). Raises ValueError for a tensor
    with no place in the model."""
    if family == "switch_transformers" or getattr(model, "n_encoder_blocks", None) is not None:  # T5's names (hf_switch.py)
        from moespec.interop import hf_switch

        return hf_switch.to_moespec(tensors, model)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if family == "gpt_oss" and (m := _GPT_OSS.fullmatch(name)):
            out.update(_gpt_oss(m, tensor))
            continue
        if family == "dbrx" and _DBRX.fullmatch(name):
            out.update(_dbrx(name, tensor, model))
            continue
        if family in ("llama4", "llama4_text") and (m := _LLAMA4.fullmatch(name)):
            out.update(_llama4(m, tensor))
            continue
        if m := _EXPERT.fullmatch(name):
            layer, e, proj = m.group(1), int(m.group(2)), _PROJ[m.group(3)]
            experts.setdefault((f"blocks.{layer}.moe.experts.w_{proj}", name), {})[e] = tensor.t()  # [F, D] -> [D, F]
            continue
        if m := _FUSED.fullmatch(name):
            bank = f"blocks.{m.group(1)}.moe.experts."
            if (m.group(2) or m.group(3)) in ("gate_up_proj", "input_linear"):  # [E, 2F, D]: gate rows, then up rows
                gate, up = tensor.chunk(2, dim=1)
                out[bank + "w_gate"], out[bank + "w_up"] = gate.transpose(1, 2), up.transpose(1, 2)
            else:  # [E, D, F]
                out[bank + "w_down"] = tensor.transpose(1, 2)
            continue
        for pattern, target in _RULES:
            if m := pattern.fullmatch(name):
                key = target.format(*m.groups())
                if key == "lm_head.bias" and "lm_head.bias" not in state and "head_bias" in state:
                    key = "head_bias"
                out[key] = tensor
                break
        else:
            raise ValueError(f"weights: {name} has no place in this spec's model (no moespec parameter takes it)")
    by_bank: dict[str, dict[int, torch.Tensor]] = {}
    for (bank, _), found in experts.items():
        by_bank.setdefault(bank, {}).update(found)
    for bank, found in by_bank.items():
        out[bank] = torch.stack([found[e] for e in sorted(found)])  # [E, D, F] or [E, F, D]
    return out


def checkpoint_config(directory: Path) -> dict:
    """The checkpoint's config.json ({} when absent or unreadable): the family decides some layouts."""
    file = Path(directory) / "config.json"
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def interleaved_rope(config: dict) -> bool:
    """Whether a checkpoint lays RoPE channels out in interleaved pairs: DeepSeek-V2 always,
    V3 unless `rope_interleave: false` (its MLA rows), Llama-4 (complex RoPE on q and k)."""
    kind = (config.get("text_config") or {}).get("model_type") or config.get("model_type")
    return kind in ("deepseek_v2", "llama4", "llama4_text", "ernie4_5_moe") or (kind == "deepseek_v3" and config.get("rope_interleave", True))


def rope_permutation(rope_dim: int) -> torch.Tensor:
    """Rows of interleaved pairs (x0, x1), (x2, x3), ... as rotate-half halves (x0, x2, ...,
    x1, x3, ...): the same rotation of every pair, so q.k is unchanged."""
    return torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))


def permute_latent_rope(mapped: dict[str, torch.Tensor], model: nn.Module, *, inverse: bool = False) -> None:
    """Reorder the RoPE rows of every MLA block's query and latent projections, in place in
    `mapped` (moespec names): interleaved -> halves on load, halves -> interleaved on export."""
    from moespec.model.latent_attention import LatentAttention
    from moespec.model.layers import CausalSelfAttention

    for name, module in model.named_modules():
        if isinstance(module, CausalSelfAttention):  # every channel of q and k rotates (Llama-4)
            perm = rope_permutation(module.head_dim)
            perm = torch.argsort(perm) if inverse else perm
            for proj, heads in (("q_proj", module.n_heads), ("k_proj", module.n_kv_heads)):
                for suffix in ("weight", "bias"):
                    key = f"{name}.{proj}.{suffix}"
                    if key in mapped:
                        w = mapped[key]
                        mapped[key] = w.reshape(heads, module.head_dim, -1)[:, perm].reshape(w.shape)
            continue
        if not isinstance(module, LatentAttention):
            continue
        perm = rope_permutation(module.rope_dim)
        if inverse:
            perm = torch.argsort(perm)
        q_name = f"{name}.q_proj.weight" if module.q_proj is not None else f"{name}.q_b_proj.weight"
        q = mapped[q_name]
        q_HDi = q.reshape(module.n_heads, module.nope + module.rope_dim, q.shape[-1])  # [H, N+P, in]
        rot = q_HDi[:, module.nope :][:, perm]
        mapped[q_name] = torch.cat((q_HDi[:, : module.nope], rot), dim=1).reshape(q.shape)
        for suffix in ("weight", "bias"):
            key = f"{name}.kv_a_proj_with_mqa.{suffix}"
            if key in mapped:
                kv = mapped[key]
                mapped[key] = torch.cat((kv[: module.kv_lora_rank], kv[module.kv_lora_rank :][perm]), dim=0)


def load_hf_weights(model: nn.Module, directory: Path) -> int:
    """Fill `model` from a Hugging Face checkpoint (or a `compile --out` folder, already in
    moespec's names); returns the tensors loaded. Every model parameter and persistent
    buffer must be given, with its shape. DeepSeek's interleaved RoPE rows are permuted to
    moespec's layout (`permute_latent_rope`)."""
    tensors = read_safetensors(directory)
    hf = "tok_embeddings.weight" not in tensors
    config = checkpoint_config(directory)
    mapped = to_moespec(tensors, model, config.get("model_type")) if hf else tensors
    state = model.state_dict()
    # A sigmoid_bias router's selection bias is state moespec adds; a checkpoint without it
    # (Llama-4: no selection bias) keeps the initial zeros, which is what that model computes.
    if missing := sorted(key for key in set(state) - set(mapped) if not key.endswith("router.expert_bias_E")):
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"weights: {directory} lacks {missing[0]}{more}; is it the checkpoint of this spec's model?")
    for key, tensor in mapped.items():
        if key not in state:
            raise ValueError(f"weights: {key} (from {directory}) has no place in this spec's model")
        if key.endswith("selection_bias_E") and tensor.numel() == state[key].numel():
            tensor = mapped[key] = tensor.reshape(state[key].shape)  # ERNIE keeps it [1, E]
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise ValueError(f"weights: {key} is {tuple(tensor.shape)} in {directory}, the spec's model has {tuple(state[key].shape)}")
    if hf and interleaved_rope(config):
        permute_latent_rope(mapped, model)
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in mapped.items()}, strict=False)  # every key checked above
    return len(mapped)


def from_moespec(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face's checkpoint names of `family` (a model_type),
    one tensor per expert."""
    out: dict[str, torch.Tensor] = {}
    mixtral = family in ("mixtral", "phimoe")  # block_sparse_moe, experts' w1 / w2 / w3
    from moespec.interop import hf_weights_out as layouts

    if family in ("dbrx", "granitemoe"):
        return layouts.to_fused(model, family)
    if family == "switch_transformers":
        from moespec.interop import hf_switch

        return hf_switch.from_moespec(model)
    if family == "gpt_oss":
        return layouts.to_gpt_oss(model)
    state = {key: tensor.detach() for key, tensor in model.state_dict().items()}
    if family in ("ernie4_5_moe", "llama4_text", "deepseek_v2"):  # their checkpoints pair RoPE channels interleaved
        permute_latent_rope(state, model, inverse=True)
    if family == "llama4_text":
        return layouts.to_llama4(state)
    for key, tensor in state.items():
        tensor = tensor.contiguous()
        if family == "ernie4_5_moe" and key.endswith("moe.router.selection_bias_E"):  # ERNIE keeps it [1, E]
            out[f"model.layers.{key.split('.')[1]}.mlp.moe_statics.e_score_correction_bias"] = tensor.reshape(1, -1)
            continue
        if m := re.fullmatch(r"blocks\.(\d+)\.(.*)", key):
            out.update(_block_to_hf(int(m.group(1)), m.group(2), tensor, mixtral=mixtral, family=family))
        else:
            out.update(from_moespec_single(key, tensor))
    return out


def _block_to_hf(layer: int, rest: str, tensor: torch.Tensor, *, mixtral: bool, family: str = "") -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}."
    moe = "block_sparse_moe." if mixtral else "mlp."
    shared = "shared_experts" if family in ("deepseek_v3", "deepseek_v2", "glm4_moe", "dots1", "ernie4_5_moe") else "shared_expert"
    simple = {
        r"attention\.(q_a|kv_a)_norm\.(weight|bias)": "self_attn.{0}_layernorm.{1}",  # MLA
        r"attn_norm\.(weight|bias)": "input_layernorm.{0}", r"ffn_norm\.(weight|bias)": "post_attention_layernorm.{0}",
        r"attention\.(\w+)\.(weight|bias)": "self_attn.{0}.{1}", r"ffn\.w_(gate|up|down)\.weight": "mlp.{0}_proj.weight",
        r"moe\.router\.gate\.weight": moe + "gate.weight", r"moe\.router\.expert_bias_E": "mlp.gate.e_score_correction_bias",
        r"moe\.shared\.ffn\.w_(gate|up|down)\.weight": "mlp." + shared + ".{0}_proj.weight", r"moe\.shared\.gate\.weight": "mlp.shared_expert_gate.weight",
    }  # fmt: skip
    for pattern, target in simple.items():
        if m := re.fullmatch(pattern, rest):
            return {prefix + target.format(*m.groups()): tensor}
    if m := re.fullmatch(r"moe\.experts\.w_(gate|up|down)", rest):
        names = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral else {p: f"{p}_proj" for p in ("gate", "up", "down")}
        return {f"{prefix}{moe}experts.{e}.{names[m.group(1)]}.weight": tensor[e].t().contiguous() for e in range(tensor.shape[0])}
    raise ValueError(f"export: blocks.{layer}.{rest} has no Hugging Face name")


def from_moespec_single(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor outside the blocks under its HF name (embedding, final norm, LM head)."""
    tensor = tensor.contiguous()
    if key == "tok_embeddings.weight":
        return {"model.embed_tokens.weight": tensor}
    if key.startswith("final_norm."):
        return {"model." + key.replace("final_norm", "norm"): tensor}
    if key.startswith("lm_head.") or key == "head_bias":
        return {"lm_head.bias" if key == "head_bias" else key: tensor}
    raise ValueError(f"export: {key} has no Hugging Face name")


def save_hf_checkpoint(model: nn.Module, directory: Path, config: dict) -> list[Path]:
    """model.safetensors and config.json in `directory`, each written atomically."""
    from safetensors.torch import save

    from moespec.files import write_atomic

    directory = Path(directory)
    tensors = from_moespec(model, config["model_type"])
    weights, cfg = directory / "model.safetensors", directory / "config.json"
    write_atomic(weights, save(tensors, metadata={"format": "pt"}))
    write_atomic(cfg, json.dumps(config, indent=2) + "\n")
    return [weights, cfg]
