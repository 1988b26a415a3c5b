"""Dense transformer parts: norms, rotary positions, causal attention, the dense FFN and the
pre-norm decoder block that carries either a dense FFN or a MoE layer.

Shape legend: B batch, S sequence, D d_model, H query heads, G key/value heads (n_kv_heads),
Hd head_dim, F dense FFN hidden width. Every constructor takes plain keyword arguments; no
module holds the spec, so a layer can be built and tested on its own.

Conventions, chosen to match the Hugging Face Llama / Mixtral / Qwen layouts so that parameter
counts agree with published models:
- no bias on any linear unless the spec asks: q/k/v (Qwen), o_proj (Phi-3.5-MoE), LM head;
- RMSNorm has a weight only (D parameters), LayerNorm a weight and a bias (2 * D) unless
  `bias=False` (DBRX);
- QK-norm (OLMoE, Qwen3) normalises q and k after their projections, before RoPE: over the
  whole projection width ("full", one weight per channel) or per head ("per_head", one
  head_dim weight shared by the heads);
- RoPE uses the "rotate half" pairing (dimension i with i + Hd/2), not interleaved pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moespec.model.regions import region

GATED_ACTIVATIONS = ("swiglu", "geglu", "swiglu_clamped")
SWIGLU_LIMIT, SWIGLU_ALPHA = 7.0, 1.702  # gpt-oss's clamped SwiGLU


def make_norm(kind: str, dim: int, *, eps: float, bias: bool = True) -> nn.Module:
    """RMSNorm (weight only) or LayerNorm (weight and, unless bias=False, a bias); the choice
    changes counts."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"unknown norm {kind!r} (expected rmsnorm or layernorm)")


def activation_fn(name: str):
    """The elementwise nonlinearity; for gated variants, the one applied to the gate branch."""
    if name == "relu":
        return F.relu
    if name in ("gelu", "geglu"):
        return F.gelu
    if name in ("swiglu", "swiglu_clamped"):
        return F.silu  # swiglu_clamped goes through `gated_activation`, which clamps
    raise ValueError(f"unknown activation {name!r} (expected relu, gelu, swiglu, geglu or swiglu_clamped)")


def gated_activation(name: str, gate: torch.Tensor, up: torch.Tensor, *, limit: float = SWIGLU_LIMIT,
                     alpha: float = SWIGLU_ALPHA) -> torch.Tensor:  # fmt: skip
    """act(gate) * up; swiglu_clamped (gpt-oss): gate clamped above at `limit`, up to
    [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate)."""
    if name != "swiglu_clamped":
        return activation_fn(name)(gate) * up
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(alpha * gate))


# --- rotary position embedding -------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """Rotates each (i, i + Hd/2) pair of a head by angle `pos * theta^(-2i/Hd)`.

    The angles are computed in the forward pass from a non-persistent `inv_freq` buffer, so
    the state dict holds no tables, nothing has to be precomputed for a maximum length, and
    the module works on the meta device too.
    """

    def __init__(self, *, head_dim: int, theta: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [Hd/2]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables for integer positions [S], float32, each [S, Hd]."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [S, Hd/2]
        angles = torch.cat((angles, angles), dim=-1)  # [S, Hd]
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # [..., Hd/2] each
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, h, S, Hd] by the tables [S, Hd]; computed in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` on the first cos.shape[-1] channels of x [..., Hd]; the rest pass through."""
    rotated = cos.shape[-1]
    if rotated == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)


# --- attention ------------------------------------------------------------------------------


class AttentionCore(nn.Module):
    """The parameter-free core of attention: causal `softmax(q k^T / sqrt(Hd)) v` with dropout
    on the probabilities. A module of its own so that it can be wrapped from outside (selective
    recomputation, moespec/distributed/parallelize.py) without touching the projections.

    enable_gqa: each group of H / G query heads reads one key/value head, without
    materialising the repeated keys and values.
    """

    def __init__(self, *, dropout: float = 0.0, enable_gqa: bool = False, window: int | None = None):
        super().__init__()
        self.dropout = dropout
        self.enable_gqa = enable_gqa
        self.window = window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """q [B, H, S, Hd], k and v [B, G, S, Hd] -> [B, H, S, Hd]; `scale`: of the scores
        (default 1/sqrt(Hd); MLA passes its unpadded width); `sinks` [H]: one logit per head
        that joins each softmax as a key with a zero value (attention sinks)."""
        S, Hd = q.shape[-2], q.shape[-1]
        window = self.window if self.window is not None and self.window < S else None
        dropout = self.dropout if self.training else 0.0
        if sinks is None and window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=self.enable_gqa, scale=scale)
        mask = attention_mask(S, window, sink=sinks is not None, device=q.device)  # [S, S] or [S, 1+S] bool
        if sinks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=self.enable_gqa, scale=scale)
        # The sink as a key, kept on SDPA's fused kernel (a float mask carrying the logits would
        # need its gradient, which only the math path gives, with S x S probabilities kept):
        # one more channel, 1/scale * sink_h in every query of head h and 1 in a key
        # prepended at position 0 (0 in the real keys), so that key scores exactly sink_h; its
        # value is zero. Keys and values stay per kv-head.
        scale = Hd**-0.5 if scale is None else scale
        B, H, G = q.shape[0], q.shape[1], k.shape[1]
        q = torch.cat((q, (sinks.to(q.dtype) / scale)[None, :, None, None].expand(B, H, S, 1)), dim=-1)  # [B, H, S, Hd+1]
        sink_key = F.pad(k.new_ones(B, G, 1, 1), (Hd, 0))  # [B, G, 1, Hd+1]: 0...0 1
        k = torch.cat((sink_key, F.pad(k, (0, 1))), dim=-2)  # [B, G, 1+S, Hd+1]
        v = F.pad(v, (0, 1, 1, 0))  # [B, G, 1+S, Hd+1]: a zero value for the sink
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=self.enable_gqa, scale=scale)
        return out[..., :Hd]


def attention_mask(S: int, window: int | None, *, sink: bool, device) -> torch.Tensor:
    """Which keys each query sees: the causal prefix, cut to the last `window` positions, and
    (sink) a leading column that every query sees. [S, S] or [S, 1 + S] bool."""
    i = torch.arange(S, device=device)
    seen = i[None, :] <= i[:, None]  # [S, S]: key j <= query i
    if window is not None:
        seen &= i[None, :] > i[:, None] - window
    return torch.cat((seen.new_ones(S, 1), seen), dim=1) if sink else seen


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with grouped key/value heads (MHA when G == H, MQA when
    G == 1). head_dim is explicit because some models (Qwen, Gemma) set it apart from D / H."""

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: str = "none",
        norm: str = "rmsnorm",
        norm_eps: float = 1e-5,
        norm_bias: bool = True,
        dropout: float = 0.0,
        sinks: bool = False,
        window: int | None = None,
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.core = AttentionCore(dropout=dropout, enable_gqa=n_kv_heads != n_heads, window=window)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None  # [H] logits
        if qk_norm not in ("none", "full", "per_head", "l2"):
            raise ValueError(f"unknown qk_norm {qk_norm!r} (expected none, full, per_head or l2)")
        self.qk_norm, self.norm_eps = qk_norm, norm_eps
        q_width, k_width = (head_dim, head_dim) if qk_norm == "per_head" else (n_heads * head_dim, n_kv_heads * head_dim)
        on = qk_norm in ("full", "per_head")  # l2 has no weights
        self.q_norm = make_norm(norm, q_width, eps=norm_eps, bias=norm_bias) if on else None
        self.k_norm = make_norm(norm, k_width, eps=norm_eps, bias=norm_bias) if on else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, S, _ = x.shape  # [B, S, D]
        q, k = self.q_proj(x), self.k_proj(x)  # [B, S, H*Hd], [B, S, G*Hd]
        if self.qk_norm == "full":
            q, k = norm_in_fp32(self.q_norm, q), norm_in_fp32(self.k_norm, k)
        # -1 heads, not n_heads: under tensor parallelism a rank holds H/tp query and G/tp kv heads
        q = q.view(B, S, -1, self.head_dim)  # [B, S, H, Hd]
        k = k.view(B, S, -1, self.head_dim)  # [B, S, G, Hd]
        if self.qk_norm == "per_head":
            q, k = norm_in_fp32(self.q_norm, q), norm_in_fp32(self.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, S, Hd], [B, G, S, Hd]
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # [B, G, S, Hd]
        if rope is not None:
            cos, sin = rope  # [S, R]: R < Hd rotates the first R channels only (partial RoPE, GLM)
            q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
            if self.qk_norm == "l2":  # Llama-4: weightless, per head, after RoPE, in RoPE layers only
                q, k = _l2_norm(q, self.norm_eps), _l2_norm(k, self.norm_eps)
        # sinks split over tensor-parallel ranks arrive as a DTensor: this rank's heads
        sinks = self.sinks.to_local() if hasattr(self.sinks, "to_local") else self.sinks
        y = self.core(q, k, v) if sinks is None else self.core(q, k, v, sinks=sinks)  # [B, H, S, Hd]
        y = y.transpose(1, 2).reshape(B, S, -1)  # [B, S, H*Hd]
        return self.o_proj(y)  # [B, S, D]


def _l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim (Llama-4's L2Norm: an RMSNorm without weight), in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def norm_in_fp32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm of a projection's output (QK-norm, MLA's latents), in float32 as Hugging Face's
    models compute it: under autocast the projection is bf16 while the norm's weight stays
    float32, and the mixed call falls off the fused kernel (with a warning per step)."""
    return norm(x) if x.dtype == torch.float32 else norm(x.float()).to(x.dtype)


# --- dense feed-forward ---------------------------------------------------------------------


class DenseFFN(nn.Module):
    """Position-wise FFN. Plain: `down(act(up(x)))`, 2*D*F weights. Gated (SwiGLU, GeGLU):
    `down(act(gate(x)) * up(x))`, 3*D*F weights, as in Llama and Mixtral experts."""

    def __init__(self, *, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.act = activation_fn(activation)
        self.activation = activation
        self.gated = activation in GATED_ACTIVATIONS
        self.w_gate = nn.Linear(d_model, d_ff, bias=False) if self.gated else None
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_up(x)  # [B, S, F]
        h = gated_activation(self.activation, self.w_gate(x), h) if self.gated else self.act(h)  # [B, S, F]
        return self.w_down(h)  # [B, S, D]


# --- decoder block --------------------------------------------------------------------------


class DecoderBlock(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + ffn(norm(x))` where the FFN is either a
    dense `ffn` or a `moe` layer (exactly one). The MoE layer's statistics and auxiliary loss
    are returned, never stored, so a forward has no side effects.

    The MoE layer is called as `moe(x, token_ids=tokens)` (hash routing needs the ids; other
    routers ignore them) and returns (y, MoEStats, aux_loss).
    """

    def __init__(
        self,
        *,
        attn_norm: nn.Module,
        attention: nn.Module,
        ffn_norm: nn.Module,
        ffn: nn.Module | None = None,
        moe: nn.Module | None = None,
        dropout: float = 0.0,
        use_rope: bool = True,
    ):
        super().__init__()
        self.use_rope = use_rope  # False: a NoPE layer (Llama-4) ignores the rotary tables
        if (ffn is None) == (moe is None):
            raise ValueError("a decoder block takes exactly one of ffn= or moe=")
        self.attn_norm = attn_norm
        self.attention = attention
        self.ffn_norm = ffn_norm
        self.ffn = ffn
        self.moe = moe
        self.resid_dropout = nn.Dropout(dropout)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def forward(
        self,
        x: torch.Tensor,  # [B, S, D]
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_ids: torch.Tensor | None = None,  # [B, S] long
    ):
        """Returns (x [B, S, D], MoEStats or None, aux_loss [] float32 or None)."""
        with region("attention"):
            x = x + self.resid_dropout(self.attention(self.attn_norm(x), rope if self.use_rope else None))
        h = self.ffn_norm(x)  # [B, S, D]
        if self.moe is None:
            with region("dense_ffn"):
                return x + self.resid_dropout(self.ffn(h)), None, None
        y, stats, aux_loss = self.moe(h, token_ids=token_ids)
        return x + self.resid_dropout(y), stats, aux_loss


def run_blocks(blocks, x: torch.Tensor, stats: list, aux_loss: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block in turn (decoder, T5 and LSTM blocks share the call: x -> (x, stats or
    None, aux or None)); the MoE blocks' stats are appended to `stats`, their aux losses
    summed in float32. Returns (x, aux_loss)."""
    for block in blocks:
        x, block_stats, block_aux = block(x, **kwargs)
        if block_stats is not None:
            stats.append(block_stats)
            aux_loss = aux_loss + block_aux.float()
    return x, aux_loss
