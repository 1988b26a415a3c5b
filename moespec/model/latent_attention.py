"""Multi-head Latent Attention (DeepSeek-V2, DeepSeek-V3).

Why it exists: keys and values come from one compressed latent per token (kv_lora_rank
wide) instead of per-head projections, which is what makes DeepSeek's KV cache small; the
rotary part of the key (qk_rope_head_dim) is computed once and shared by every head, since
RoPE cannot be absorbed into the latent. Queries may pass through a low-rank bottleneck too.

Shape legend: B batch, S sequence, D d_model, H heads, Rq q_lora_rank, Rkv kv_lora_rank,
N qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim. Module names follow Hugging Face's
DeepSeek classes (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj) with moespec's norm
names (q_a_norm, kv_a_norm), so checkpoints map one to one.

Values are zero-padded to the query/key width before attention (as Hugging Face does for
flash attention): SDPA's fused CPU and flash kernels need one head width, and without them
it falls back to the math path, which keeps the S x S probabilities of every head for
backward. The padding costs the value matmul's extra columns (counted: sim/counts.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moespec.model.layers import AttentionCore, norm_in_fp32, apply_rope, make_norm


class LatentAttention(nn.Module):
    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-6,
        norm_bias: bool = True,
        out_bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.n_heads, self.nope, self.rope_dim, self.v_dim = n_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.kv_lora_rank = kv_lora_rank
        qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_a_norm = make_norm(norm, q_lora_rank, eps=norm_eps, bias=norm_bias)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * qk, bias=False)
            self.q_proj = None
        else:
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
            self.q_proj = nn.Linear(d_model, n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_norm = make_norm(norm, kv_lora_rank, eps=norm_eps, bias=norm_bias)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.core = AttentionCore(dropout=dropout)
        self.o_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=out_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, D]
        H = self.n_heads
        if self.q_proj is not None:
            q = self.q_proj(x)  # [B, S, H*(N+P)]
        else:
            q = self.q_b_proj(norm_in_fp32(self.q_a_norm, self.q_a_proj(x)))  # [B, S, Rq] -> [B, S, H*(N+P)]
        q = q.view(B, S, H, self.nope + self.rope_dim).transpose(1, 2)  # [B, H, S, N+P]
        q_nope, q_rot = q.split((self.nope, self.rope_dim), dim=-1)
        latent = self.kv_a_proj_with_mqa(x)  # [B, S, Rkv+P]
        c_kv, k_rot = latent.split((self.kv_lora_rank, self.rope_dim), dim=-1)
        kv = self.kv_b_proj(norm_in_fp32(self.kv_a_norm, c_kv)).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)  # [B, H, S, N+V]
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)
        k_rot = k_rot.view(B, 1, S, self.rope_dim)  # [B, 1, S, P]: one rotary key for all heads
        if rope is not None:
            cos, sin = rope
            q_rot, k_rot = apply_rope(q_rot, cos, sin), apply_rope(k_rot, cos, sin)
        q = torch.cat((q_nope, q_rot), dim=-1)  # [B, H, S, N+P]
        k = torch.cat((k_nope, k_rot.expand(B, H, S, self.rope_dim)), dim=-1)  # [B, H, S, N+P]
        width = self.nope + self.rope_dim
        if self.v_dim != width:  # one head width for q, k and v, so SDPA takes its fused kernel
            pad = max(width, self.v_dim)
            q, k, v = (F.pad(t, (0, pad - t.shape[-1])) if t.shape[-1] < pad else t for t in (q, k, v))
        y = self.core(q, k, v, scale=width**-0.5)[..., : self.v_dim]  # [B, H, S, V]
        y = y.transpose(1, 2).reshape(B, S, H * self.v_dim)  # [B, S, H*V]
        return self.o_proj(y)  # [B, S, D]
