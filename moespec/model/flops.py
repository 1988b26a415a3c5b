"""FLOP formulas torch 2.13 lacks: its CPU flash-attention kernels count as 0 in
FlopCounterMode (the CUDA and meta paths are counted), which would make the profiler's FLOPs
depend on the device. Registered once, on import, in torch's own formula registry.

Scores and values are two matmuls: 4*B*H*Sq*Skv*hd forward; the backward is four
(grad of scores, values, queries, keys): 8*B*H*Sq*Skv*hd, as torch counts the CUDA kernels.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

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
