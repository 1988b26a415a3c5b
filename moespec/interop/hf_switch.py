"""Hugging Face SwitchTransformers (Fedus et al. 2021's T5 encoder-decoders) both ways: its
config as a spec, its checkpoints into the compiled encoder-decoder, and back.

Why apart from the decoder families: the names are T5's (`encoder.block.3.layer.1.mlp...`,
one numbering per stack, the FFN at layer 1 of an encoder block and layer 2 of a decoder
block), experts are a dict of per-expert `wi`/`wo`, and the relative-bias table sits in each
stack's block 0. moespec numbers blocks through the model, the encoder's first
(model/encoder_decoder.py).

What HF's config says that the spec maps differently, listed on import:
- `expert_capacity` is a number of tokens per expert per sequence; moespec sizes capacity by
  a factor per routing group (a micro-batch): the factor giving the same slots at the
  encoder length is written.
- HF places experts where `i % sparse_step == 1` in each stack (every block when the step is
  1), which is placement every/offset 1.
"""

from __future__ import annotations

import math
import re

import torch

from moespec.interop.hf_config import _placement, _Reader

_FF = {"encoder": "1", "decoder": "2"}  # the FFN's position in a T5 block of each stack


def switch(r: _Reader, seq: int) -> tuple[dict, dict]:
    """The spec of a SwitchTransformers config; `seq` is the encoder's (input) length."""
    act = r.take("dense_act_fn", "relu")
    if r.take("is_gated_act", False) or act not in ("relu", "gelu", "gelu_new"):
        r.refuse("dense_act_fn", f"{act!r} (gated: {r.config.get('is_gated_act')}) is not expressible (moespec's T5 FFN is relu or gelu, ungated)")
    r.note("feed_forward_proj", "T5's name for dense_act_fn, read from that")
    n_enc, n_dec = r.take("num_layers", required=True), r.take("num_decoder_layers") or r.config["num_layers"]
    wanted = []
    for stack, n in (("encoder", n_enc), ("decoder", n_dec)):  # HF derives the step from the count (its config's __init__)
        sparse = int(r.take(f"num_sparse_{stack}_layers", 3))
        r.note(f"{stack}_sparse_step", f"derived by transformers from num_sparse_{stack}_layers, as read here")
        if sparse <= 0:
            r.refuse(f"num_sparse_{stack}_layers", "a stack without experts is not expressible (moe.placement applies to both stacks)")
        step = n // sparse
        wanted.append([i for i in range(n) if step == 1 or i % step == 1])
    placement = next((p for p in (_placement(n_enc, wanted[0]), _placement(n_dec, wanted[1]))
                      if [_apply(p, n) for n in (n_enc, n_dec)] == wanted), None)  # fmt: skip
    if placement is None:
        r.refuse("num_sparse_decoder_layers", f"experts in encoder blocks {wanted[0]} and decoder blocks {wanted[1]}: no one placement gives both (a spec places experts alike in both stacks)")
    if not r.take("tie_word_embeddings", True):
        r.refuse("tie_word_embeddings", "false: transformers then keeps the encoder's, the decoder's and the shared embedding apart (three tables), which the spec's one shared table cannot express")
    heads, d_kv, d = r.take("num_heads", required=True), r.take("d_kv", required=True), r.take("d_model", required=True)
    targets = _targets(seq)
    model = {
        "vocab_size": r.take("vocab_size", required=True), "d_model": d, "n_layers": n_dec, "n_heads": heads,
        "d_ff": r.take("d_ff", required=True), "activation": "relu" if act == "relu" else "gelu", "norm": "rmsnorm",
        "norm_eps": float(r.take("layer_norm_epsilon", 1e-6)), "positions": "relative",
        "relative_attention": {"buckets": r.take("relative_attention_num_buckets", 32), "max_distance": r.take("relative_attention_max_distance", 128)},
        "tied_embeddings": True, "seq_len": targets,
        "dropout": float(r.take("dropout_rate", 0.1)), "encoder": {"n_layers": n_enc, "seq_len": seq},
    }  # fmt: skip
    if d_kv * heads != d:
        model["head_dim"] = d_kv
    experts = r.take("num_experts", required=True)
    capacity = r.take("expert_capacity", 64)
    factor = capacity * experts / seq
    r.notes.append(f"expert_capacity: {capacity} tokens per expert per sequence; written as capacity factor {factor:g} at {seq} input tokens")
    r.note("router_jitter_noise", "mapped to the switch router's jitter_eps")
    r.note("router_dtype", "the router runs in float32 (selective precision), as moespec's always does")
    r.note("router_ignore_padding_tokens", "moespec's batches have no padding in the encoder")
    r.note("initializer_factor", "T5's initialisation scale; moespec initialises with model.init_std")
    r.note("add_router_probs", "an output option of HF's forward; nothing to build")
    r.note("is_decoder", "HF's stack flag; the spec's encoder says it")
    r.note("router_type", "tokens_masked: top-1 tokens-choose routing with capacity, the switch router")
    r.note("decoder_start_token_id", "generation's first decoder token; training feeds the shifted targets")
    r.note("is_gated_act", "false: an ungated FFN (read above)")
    r.note("add_cross_attention", "HF's stack flag; every decoder block has cross-attention")
    router = {"type": "switch", "bias": bool(r.take("router_bias", False)), "jitter_eps": float(r.config.get("router_jitter_noise") or 0.0),
              "aux_loss_coef": float(r.take("router_aux_loss_coef", 0.01)), "z_loss_coef": float(r.take("router_z_loss_coef", 0.0))}  # fmt: skip
    moe = {"placement": placement, "experts": {"count": int(experts)}, "router": router, "capacity": {"factor": factor}}
    return model, moe


def _apply(placement: dict, n: int) -> list[int]:
    """The blocks of an n-block stack a placement (as `_placement` writes them) makes MoE."""
    if placement["type"] == "all":
        return list(range(placement.get("first_dense", 0), n))
    if placement["type"] == "every":
        return [i for i in range(placement["offset"], n) if (i - placement["offset"]) % placement["every"] == 0]
    return [i for i in placement["layers"] if i < n] if all(i < n for i in placement["layers"]) else []


def _targets(inputs: int) -> int:
    """T5's target length for `inputs` input tokens (15% noise, mean span 3)."""
    from moespec.data.span_corruption import corrupted_lengths, raw_length_for

    return corrupted_lengths(raw_length_for(inputs, inputs, 0.15, 3.0), 0.15, 3.0)[1]


def to_moespec(tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """HF SwitchTransformers names -> the compiled encoder-decoder's state-dict names."""
    n_enc = model.n_encoder_blocks
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            out["tok_embeddings.weight"] = tensor  # one table, tied through the model
            continue
        if name == "lm_head.weight":
            if model.lm_head is not None:
                out["lm_head.weight"] = tensor
            continue  # a tied head is the embedding
        if m := re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", name):
            out["encoder_norm.weight" if m.group(1) == "encoder" else "final_norm.weight"] = tensor
            continue
        m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)", name)
        if m is None:
            raise ValueError(f"weights: {name} has no place in this spec's model (no moespec parameter takes it)")
        stack, i, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        block = f"blocks.{i + (n_enc if stack == 'decoder' else 0)}."
        rules = {
            r"SelfAttention\.([qkvo])\.weight": block + "attention.{0}_proj.weight",
            r"SelfAttention\.relative_attention_bias\.weight": stack + "_bias.table.weight",
            r"EncDecAttention\.([qkvo])\.weight": block + "cross_attention.{0}_proj.weight",
            r"mlp\.wi\.weight": block + "ffn.w_up.weight", r"mlp\.wo\.weight": block + "ffn.w_down.weight",
            r"mlp\.router\.classifier\.(weight|bias)": block + "moe.router.gate.{0}",
        }  # fmt: skip
        if rest == "layer_norm.weight":
            norm = "attn_norm" if sub == "0" else "ffn_norm" if sub == _FF[stack] else "cross_norm"
            out[block + norm + ".weight"] = tensor
            continue
        if e := re.fullmatch(r"mlp\.experts\.expert_(\d+)\.(wi|wo)\.weight", rest):
            bank = block + ("moe.experts.w_up" if e.group(2) == "wi" else "moe.experts.w_down")
            experts.setdefault(bank, {})[int(e.group(1))] = tensor.t()  # [F, D] -> [D, F]; [D, F] -> [F, D]
            continue
        for pattern, target in rules.items():
            if r := re.fullmatch(pattern, rest):
                out[target.format(*r.groups())] = tensor
                break
        else:
            raise ValueError(f"weights: {name} has no place in this spec's model (no moespec parameter takes it)")
    for bank, found in experts.items():
        out[bank] = torch.stack([found[e] for e in sorted(found)])
    return out


def from_moespec(model) -> dict[str, torch.Tensor]:
    """The compiled encoder-decoder's tensors under SwitchTransformers' names (tied: `shared`
    alone, as transformers saves a tied model)."""
    n_enc = model.n_encoder_blocks
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().contiguous()
        simple = {"tok_embeddings.weight": "shared.weight", "lm_head.weight": "lm_head.weight", "encoder_norm.weight": "encoder.final_layer_norm.weight",
                  "final_norm.weight": "decoder.final_layer_norm.weight", "encoder_bias.table.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  "decoder_bias.table.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}  # fmt: skip
        if key in simple:
            out[simple[key]] = tensor
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        g, rest = int(m.group(1)), m.group(2)
        stack, i = ("encoder", g) if g < n_enc else ("decoder", g - n_enc)
        prefix, ff = f"{stack}.block.{i}.layer.", _FF[stack]
        names = {"attn_norm.weight": "0.layer_norm.weight", "cross_norm.weight": "1.layer_norm.weight", "ffn_norm.weight": ff + ".layer_norm.weight",
                 "ffn.w_up.weight": ff + ".mlp.wi.weight", "ffn.w_down.weight": ff + ".mlp.wo.weight",
                 "moe.router.gate.weight": ff + ".mlp.router.classifier.weight", "moe.router.gate.bias": ff + ".mlp.router.classifier.bias"}  # fmt: skip
        if rest in names:
            out[prefix + names[rest]] = tensor
        elif a := re.fullmatch(r"(attention|cross_attention)\.([qkvo])_proj\.weight", rest):
            out[prefix + ("0.SelfAttention." if a.group(1) == "attention" else "1.EncDecAttention.") + a.group(2) + ".weight"] = tensor
        elif rest in ("moe.experts.w_up", "moe.experts.w_down"):
            proj = "wi" if rest.endswith("w_up") else "wo"
            out.update({f"{prefix}{ff}.mlp.experts.expert_{e}.{proj}.weight": tensor[e].t().contiguous() for e in range(tensor.shape[0])})
        else:
            raise ValueError(f"export: {key} has no Hugging Face name")
    return out


def export_config(plan) -> dict:
    """SwitchTransformers' config.json for an encoder-decoder plan, or ValueError naming the
    first spec key that config cannot hold."""
    m, layers = plan.model, plan.moe_layers
    if m.encoder is None:
        raise ValueError("model.encoder: switch_transformers is an encoder-decoder; the spec is decoder-only")
    first = layers[0].moe
    enc = [i for i, layer in enumerate(plan.encoder_layers) if layer.moe is not None]
    dec = [i for i, layer in enumerate(plan.decoder_layers) if layer.moe is not None]
    step = 1 if enc == list(range(m.encoder.n_layers)) else (enc[1] - enc[0] if len(enc) > 1 else m.encoder.n_layers)
    hf_rule = [[i for i in range(n) if step == 1 or i % step == 1] for n in (m.encoder.n_layers, m.n_layers)]
    want = {
        "model.activation": m.activation in ("relu", "gelu"), "model.norm": m.norm == "rmsnorm",
        "moe.placement": [enc, dec] == hf_rule, "moe.overrides": all(layer.moe == first for layer in layers),
        "moe.router.type": first.router.type == "switch", "moe.experts.d_ff": first.experts.d_ff == m.d_ff,
        "moe.experts.shared_count": first.experts.shared_count == 0, "moe.capacity": first.capacity is not None and first.capacity.factor is not None,
    }  # fmt: skip
    for key, ok in want.items():
        if not ok:
            raise ValueError(f"{key}: the spec's value has no place in a switch_transformers config; change the spec")
    router = first.router
    capacity = math.ceil(first.capacity.factor * m.encoder.seq_len / first.experts.count)  # per sequence, as HF routes
    return {
        "architectures": ["SwitchTransformersForConditionalGeneration"], "model_type": "switch_transformers", "vocab_size": m.vocab_size,
        "d_model": m.d_model, "d_kv": m.head_dim, "d_ff": m.d_ff, "num_layers": m.encoder.n_layers, "num_decoder_layers": m.n_layers,
        "num_heads": m.n_heads, "num_experts": first.experts.count, "expert_capacity": capacity,
        "num_sparse_encoder_layers": len(enc), "num_sparse_decoder_layers": len(dec), "encoder_sparse_step": step, "decoder_sparse_step": step,
        "router_bias": router.bias, "router_jitter_noise": router.jitter_eps, "router_dtype": "float32", "router_ignore_padding_tokens": False,
        "relative_attention_num_buckets": m.relative_buckets, "relative_attention_max_distance": m.relative_max_distance,
        "dropout_rate": m.dropout, "layer_norm_epsilon": m.norm_eps, "router_z_loss_coef": router.z_loss_coef,
        "router_aux_loss_coef": router.aux_loss_coef, "dense_act_fn": m.activation, "is_gated_act": False,
        "tie_word_embeddings": m.tied_embeddings, "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, "torch_dtype": "float32",
    }  # fmt: skip
