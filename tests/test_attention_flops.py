"""Attention FLOPs counted as the simulator counts them, whichever kernel runs
(moespec/model/flops.py). The CUDA fused kernels' backward is counted here through their meta
kernels: the same ops and shapes FlopCounterMode sees on a GPU, without one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from moespec.model.flops import flop_counter

aten = torch.ops.aten
B, H, S, HD = 2, 4, 64, 16
TEXTBOOK = 12 * B * H * S * S * HD  # 2 matmuls forward, 4 backward, 2 * B*H*S*S*HD each


def _efficient_attention_step(counter) -> int:
    q_BHSD, k_BHSD, v_BHSD, grad_BHSD = (torch.randn(B, H, S, HD, device="meta") for _ in range(4))
    with counter as c:
        out, logsumexp, seed, offset = aten._scaled_dot_product_efficient_attention(q_BHSD, k_BHSD, v_BHSD, None, True)
        aten._scaled_dot_product_efficient_attention_backward(
            grad_BHSD, q_BHSD, k_BHSD, v_BHSD, None, out, logsumexp, seed, offset, 0.0, [True, True, True, False]
        )
    return c.get_total_flops()


def test_a_fused_kernels_backward_counts_the_four_textbook_matmuls():
    assert _efficient_attention_step(flop_counter()) == TEXTBOOK
    # torch's own formula adds the scores the kernel recomputes: what made an H200 profile 2.4% high
    assert _efficient_attention_step(FlopCounterMode(display=False)) == TEXTBOOK + 2 * B * H * S * S * HD


def test_the_cpu_kernel_counts_the_same():
    q_BHSD, k_BHSD, v_BHSD = (torch.randn(B, H, S, HD, requires_grad=True) for _ in range(3))
    with flop_counter() as c:
        F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, is_causal=True).sum().backward()
    assert c.get_total_flops() == TEXTBOOK
