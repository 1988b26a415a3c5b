"""Attention FLOPs counted the same on every device, as the simulator counts them.

Scores and values are two matmuls: 4*B*H*Sq*Skv*hd forward; the backward is four (grad of
scores, values, queries, keys): 8*B*H*Sq*Skv*hd (REFERENCE.md: the textbook matmuls, no
recomputation). torch 2.13's FlopCounterMode disagrees on two devices:
- its CPU flash-attention kernels count as 0: their formulas are registered here, once, on
  import, in torch's own registry;
- its CUDA fused kernels (flash, memory-efficient, cuDNN) count a fifth matmul in backward,
  the scores the kernel recomputes: on an H200 the profiler's FLOPs of tiny-topk were 2.4%
  above the simulator's (710,410,240 against 693,633,024, one [S, hd] x [hd, S] product per
  layer). `flop_counter()` counts them as the textbook four (torch's own registry is left
  alone), so the agreement is exact on GPUs too.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

aten = torch.ops.aten


def _attention_forward_flops(query_shape, value_shape) -> int:
    batch, heads, q_len, head_dim = query_shape  # [B, H, Sq, hd]; GQA keys have fewer heads
    kv_len, value_dim = value_shape[-2], value_shape[-1]
    return 2 * batch * heads * q_len * kv_len * head_dim + 2 * batch * heads * q_len * kv_len * value_dim


if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _cpu_flash_forward(query, key, value, *args, out_val=None, **kwargs) -> int:
        return _attention_forward_flops(query.shape, value.shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _cpu_flash_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return 2 * _attention_forward_flops(query.shape, value.shape)


def _fused_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_forward_flops(query_shape, value_shape)


_FUSED_BACKWARDS = ("_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
                    "_scaled_dot_product_cudnn_attention_backward")  # fmt: skip
TEXTBOOK = {getattr(aten, name): _fused_backward for name in _FUSED_BACKWARDS if hasattr(aten, name)}


def flop_counter():
    """FlopCounterMode with attention's backward counted as the four textbook matmuls on every
    device (module docstring)."""
    return FlopCounterMode(display=False, custom_mapping=TEXTBOOK)
