"""Checkpoint layouts on export of the families that do not use Llama's names for their MoE
blocks: Llama-4 (`feed_forward`, a bank input-first with gate and up halves), DBRX (its own
names, a fused Wqkv, banks [E*F, D]), Granite (fused input_linear/output_linear) and gpt-oss
(banks input-first, gate and up interleaved by column). Each is the inverse of its loader in
hf_weights.py, and tests/test_hf_weights.py loads the result in transformers.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from moespec.interop.hf_weights import _block_to_hf, from_moespec_single


def to_llama4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Llama-4's `feed_forward` names, its bank input-first with gate and up halves (`_llama4`'s inverse)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.*)", key)
        if m is None:
            out.update(from_moespec_single(key, tensor))
            continue
        prefix, rest = f"model.layers.{m.group(1)}.feed_forward.", m.group(2)
        if rest == "moe.experts.w_gate":
            out[prefix + "experts.gate_up_proj"] = torch.cat((tensor, state[key.replace("w_gate", "w_up")]), dim=-1).contiguous()
        elif rest == "moe.experts.w_down":
            out[prefix + "experts.down_proj"] = tensor.contiguous()
        elif rest == "moe.router.gate.weight":
            out[prefix + "router.weight"] = tensor.contiguous()
        elif s := re.fullmatch(r"moe\.shared\.ffn\.w_(gate|up|down)\.weight", rest):
            out[prefix + f"shared_expert.{s.group(1)}_proj.weight"] = tensor.contiguous()
        elif d := re.fullmatch(r"ffn\.w_(gate|up|down)\.weight", rest):
            out[prefix + f"{d.group(1)}_proj.weight"] = tensor.contiguous()
        elif rest not in ("moe.experts.w_up", "moe.router.expert_bias_E"):  # Llama-4 has no selection bias (it stays 0)
            out.update(_block_to_hf(int(m.group(1)), rest, tensor.contiguous(), mixtral=False))
    return out


def to_fused(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """DBRX (its own names, a fused Wqkv, banks [E*F, D]) and Granite (fused banks
    input_linear [E, 2F, D], output_linear [E, D, F]), the inverse of the loaders above."""
    state = {key: tensor.detach() for key, tensor in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.*)", key)
        if m is None:
            if family == "dbrx":
                names = {"tok_embeddings.weight": "transformer.wte.weight", "final_norm.weight": "transformer.norm_f.weight", "lm_head.weight": "lm_head.weight"}
                out[names[key]] = tensor.contiguous()
            else:
                out.update(from_moespec_single(key, tensor))
            continue
        layer, rest = m.group(1), m.group(2)
        if family == "granitemoe":
            prefix = f"model.layers.{layer}.block_sparse_moe."
            if rest == "moe.experts.w_gate":
                up = state[key.replace("w_gate", "w_up")]
                out[prefix + "input_linear.weight"] = torch.cat((tensor, up), dim=2).transpose(1, 2).contiguous()  # [E, 2F, D]
            elif rest == "moe.experts.w_down":
                out[prefix + "output_linear.weight"] = tensor.transpose(1, 2).contiguous()  # [E, D, F]
            elif rest == "moe.router.gate.weight":
                out[prefix + "router.layer.weight"] = tensor.contiguous()
            elif rest != "moe.experts.w_up":
                out.update(_block_to_hf(int(layer), rest, tensor.contiguous(), mixtral=False))
            continue
        prefix = f"transformer.blocks.{layer}."
        simple = {"attn_norm.weight": "norm_attn_norm.norm_1.weight", "ffn_norm.weight": "norm_attn_norm.norm_2.weight",
                  "attention.o_proj.weight": "norm_attn_norm.attn.out_proj.weight", "moe.router.gate.weight": "ffn.router.layer.weight"}  # fmt: skip
        if rest in simple:
            out[prefix + simple[rest]] = tensor.contiguous()
        elif rest == "attention.q_proj.weight":
            qkv = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[prefix + "norm_attn_norm.attn.Wqkv.weight"] = torch.cat(qkv, dim=0).contiguous()
        elif rest in ("moe.experts.w_gate", "moe.experts.w_up"):  # [E, D, F] -> [E*F, D]
            out[prefix + "ffn.experts.mlp." + ("w1" if rest.endswith("gate") else "v1")] = tensor.transpose(1, 2).reshape(-1, tensor.shape[1]).contiguous()
        elif rest == "moe.experts.w_down":  # [E, F, D] -> [E*F, D]
            out[prefix + "ffn.experts.mlp.w2"] = tensor.reshape(-1, tensor.shape[2]).contiguous()
        elif rest not in ("attention.k_proj.weight", "attention.v_proj.weight"):
            raise ValueError(f"export: {key} has no DBRX name")
    return out


def to_gpt_oss(model: nn.Module) -> dict[str, torch.Tensor]:
    """gpt-oss's layout (see `_gpt_oss`): banks input-first, gate and up interleaved by column."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for key, tensor in state.items():
        tensor = tensor.detach()
        m = re.fullmatch(r"blocks\.(\d+)\.(.*)", key)
        if m is None:
            out.update(from_moespec_single(key, tensor))
            continue
        prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest == "attention.sinks":
            out[prefix + "self_attn.sinks"] = tensor.contiguous()
        elif rest.startswith("moe.router.gate."):
            out[prefix + "mlp.router." + rest.rsplit(".", 1)[1]] = tensor.contiguous()
        elif rest in ("moe.experts.w_gate", "moe.experts.b_gate"):
            up = state[key.replace("_gate", "_up")].detach()
            name = "gate_up_proj" if rest.endswith("w_gate") else "gate_up_proj_bias"
            out[prefix + "mlp.experts." + name] = torch.stack((tensor, up), dim=-1).flatten(-2).contiguous()  # gate, up, gate, up...
        elif rest in ("moe.experts.w_up", "moe.experts.b_up"):
            continue  # interleaved with the gate above
        elif rest in ("moe.experts.w_down", "moe.experts.b_down"):
            out[prefix + "mlp.experts." + ("down_proj" if rest.endswith("w_down") else "down_proj_bias")] = tensor.contiguous()
        else:
            out.update(_block_to_hf(int(m.group(1)), rest, tensor.contiguous(), mixtral=False))
    return out
