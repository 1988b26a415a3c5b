"""A T5-style encoder-decoder (Raffel et al. 2020) carrying MoE layers, as Switch Transformer
and ST-MoE were built: the seeds' own systems, which a decoder-only spec cannot express.

Why its own module and not options on the decoder: the encoder attends both ways, every
decoder block attends to the encoder's output (cross-attention, its own norm and q, k, v, o),
and positions are T5's relative bias: one learned [buckets, H] table per stack, looked up once
per forward and added to every self-attention's logits in that stack; logits are not scaled
by 1/sqrt(head_dim) (T5 folds that into the initialisation). The blocks themselves are the
decoder-only model's parts (norms, DenseFFN, the MoE layer), so routers, experts, dispatch and
expert parallelism are shared.

Layout matches Hugging Face's SwitchTransformers so that counts agree (Switch-Base-8:
619,339,008 parameters): no bias anywhere, RMSNorm, a tied LM head scaled by d_model^-0.5
(T5's Mesh TensorFlow convention). `blocks` lists every block, the encoder's first, so data
parallel wrapping, recomputation and counting see the blocks as they see a decoder's.
Shape legend: B batch, S encoder (input) tokens, T decoder (target) tokens, D d_model, H
heads, Hd head_dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moespec.model.layers import DenseFFN, make_norm, run_blocks
from moespec.model.regions import region
from moespec.model.types import ModelAux


def relative_position_bucket(relative_QK: torch.Tensor, *, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each offset (key position - query position): half the buckets hold exact
    small offsets, the rest grow logarithmically to `max_distance`; a bidirectional stack
    spends half its buckets on positive offsets, a causal one sees only the past."""
    bucket_QK = torch.zeros_like(relative_QK)
    if bidirectional:
        buckets //= 2
        bucket_QK = bucket_QK + (relative_QK > 0).long() * buckets
        distance_QK = relative_QK.abs()
    else:
        distance_QK = -torch.clamp(relative_QK, max=0)
    exact = buckets // 2
    small = distance_QK < exact
    far = exact + (torch.log(distance_QK.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    far = torch.clamp(far, max=buckets - 1)
    return bucket_QK + torch.where(small, distance_QK, far)


class RelativePositionBias(nn.Module):
    """One stack's learned bias per (bucket, head), as logits [1, H, Q, K]."""

    def __init__(self, *, n_heads: int, buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.table = nn.Embedding(buckets, n_heads)  # [buckets, H]
        self.buckets, self.max_distance, self.bidirectional = buckets, max_distance, bidirectional

    def forward(self, queries: int, keys: int, device) -> torch.Tensor:
        relative_QK = torch.arange(keys, device=device)[None, :] - torch.arange(queries, device=device)[:, None]
        bucket_QK = relative_position_bucket(relative_QK, bidirectional=self.bidirectional, buckets=self.buckets,
                                             max_distance=self.max_distance)  # fmt: skip
        return self.table(bucket_QK).permute(2, 0, 1).unsqueeze(0)  # [1, H, Q, K]


class T5Attention(nn.Module):
    """Self- or cross-attention without biases or logit scaling. `bias_1HQK` carries the
    relative positions (and the decoder's causal mask); SDPA then takes its math path, which
    gives the bias its gradient. Cross-attention has no bias and keeps the fused kernel."""

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.n_heads, self.head_dim, self.dropout = n_heads, head_dim, dropout

    def forward(self, x_BQD: torch.Tensor, context_BKD: torch.Tensor | None = None, bias_1HQK: torch.Tensor | None = None) -> torch.Tensor:
        context_BKD = x_BQD if context_BKD is None else context_BKD
        B, Q, _ = x_BQD.shape
        K = context_BKD.shape[1]
        q_BHQd = self.q_proj(x_BQD).view(B, Q, self.n_heads, self.head_dim).transpose(1, 2)
        k_BHKd = self.k_proj(context_BKD).view(B, K, self.n_heads, self.head_dim).transpose(1, 2)
        v_BHKd = self.v_proj(context_BKD).view(B, K, self.n_heads, self.head_dim).transpose(1, 2)
        if bias_1HQK is not None:
            bias_1HQK = bias_1HQK.to(q_BHQd.dtype)  # autocast: the mask in the compute dtype
        out_BHQd = F.scaled_dot_product_attention(q_BHQd, k_BHKd, v_BHKd, attn_mask=bias_1HQK, scale=1.0,
                                                  dropout_p=self.dropout if self.training else 0.0)  # fmt: skip
        return self.o_proj(out_BHQd.transpose(1, 2).reshape(B, Q, self.n_heads * self.head_dim))


class EncDecBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention (decoder blocks), then a dense FFN or a
    MoE layer; residual dropout after each, as T5 has it."""

    def __init__(self, *, attn_norm: nn.Module, attention: T5Attention, ffn_norm: nn.Module, ffn: nn.Module | None = None,
                 moe: nn.Module | None = None, cross_norm: nn.Module | None = None, cross_attention: T5Attention | None = None,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        if (ffn is None) == (moe is None):
            raise ValueError("a block takes exactly one of ffn= or moe=")
        self.attn_norm, self.attention = attn_norm, attention
        self.cross_norm, self.cross_attention = cross_norm, cross_attention
        self.ffn_norm, self.ffn, self.moe = ffn_norm, ffn, moe
        self.resid_dropout = nn.Dropout(dropout)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def forward(self, x_BQD: torch.Tensor, *, bias_1HQK: torch.Tensor, context_BKD: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None):  # fmt: skip
        """Returns (x [B, Q, D], MoEStats or None, aux_loss or None), as DecoderBlock does."""
        with region("attention"):
            x_BQD = x_BQD + self.resid_dropout(self.attention(self.attn_norm(x_BQD), bias_1HQK=bias_1HQK))
            if self.cross_attention is not None:
                x_BQD = x_BQD + self.resid_dropout(self.cross_attention(self.cross_norm(x_BQD), context_BKD))
        h_BQD = self.ffn_norm(x_BQD)
        if self.moe is None:
            with region("dense_ffn"):
                return x_BQD + self.resid_dropout(self.ffn(h_BQD)), None, None
        y_BQD, stats, aux_loss = self.moe(h_BQD, token_ids=token_ids)
        return x_BQD + self.resid_dropout(y_BQD), stats, aux_loss


class EncoderDecoderTransformer(nn.Module):
    """Shared token embedding; encoder blocks, its final norm; decoder blocks, final norm, LM
    head (tied: the embedding, applied to the output scaled by D^-0.5)."""

    def __init__(self, *, tok_embeddings: nn.Embedding, blocks: list[EncDecBlock], n_encoder_blocks: int,
                 encoder_bias: RelativePositionBias, decoder_bias: RelativePositionBias, encoder_norm: nn.Module,
                 final_norm: nn.Module, lm_head: nn.Linear | None, dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.blocks = nn.ModuleList(blocks)
        self.n_encoder_blocks = n_encoder_blocks
        self.encoder_bias, self.decoder_bias = encoder_bias, decoder_bias
        self.encoder_norm, self.final_norm = encoder_norm, final_norm
        self.lm_head = lm_head
        self.dropout = nn.Dropout(dropout)
        self.pos_embeddings = None  # counted like a decoder's (positions live in the bias tables)
        self.head_bias = None

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is None

    @property
    def max_seq_len(self) -> int | None:
        return None  # relative positions have no table length

    def encode(self, inputs_BS: torch.Tensor) -> tuple[torch.Tensor, list, torch.Tensor]:
        """inputs [B, S] -> (encoder output [B, S, D], MoE stats, summed aux loss)."""
        S = inputs_BS.shape[1]
        x_BSD = self.dropout(self.tok_embeddings(inputs_BS))
        bias_1HSS = self.encoder_bias(S, S, inputs_BS.device)
        stats, aux = [], torch.zeros((), dtype=torch.float32, device=inputs_BS.device)
        x_BSD, aux = run_blocks(self.blocks[: self.n_encoder_blocks], x_BSD, stats, aux, bias_1HQK=bias_1HSS, token_ids=inputs_BS)
        return self.dropout(self.encoder_norm(x_BSD)), stats, aux

    def forward(self, inputs_BS: torch.Tensor, decoder_inputs_BT: torch.Tensor) -> tuple[torch.Tensor, ModelAux]:
        """(inputs [B, S], decoder inputs [B, T]) -> (logits [B, T, V], ModelAux)."""
        context_BSD, stats, aux = self.encode(inputs_BS)
        T = decoder_inputs_BT.shape[1]
        y_BTD = self.dropout(self.tok_embeddings(decoder_inputs_BT))
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=y_BTD.device).tril()
        bias_1HTT = self.decoder_bias(T, T, y_BTD.device).masked_fill(~causal_TT, float("-inf"))
        y_BTD, aux = run_blocks(self.blocks[self.n_encoder_blocks :], y_BTD, stats, aux, bias_1HQK=bias_1HTT, context_BKD=context_BSD,
                                token_ids=decoder_inputs_BT)  # fmt: skip
        y_BTD = self.dropout(self.final_norm(y_BTD))
        if self.lm_head is None:
            logits_BTV = F.linear(y_BTD * self.tok_embeddings.embedding_dim**-0.5, self.tok_embeddings.weight)
        else:
            logits_BTV = self.lm_head(y_BTD)
        return logits_BTV, ModelAux(aux_loss=aux, moe=stats)


def assemble_encoder_decoder(plan, moe_builder) -> EncoderDecoderTransformer:
    """The modules of an encoder-decoder plan (initialised by build.py). `moe_builder(layer)`
    makes a MoE layer as the decoder-only model does."""
    m = plan.model

    def norm():
        return make_norm(m.norm, m.d_model, eps=m.norm_eps, bias=m.norm_bias)

    def attention():
        return T5Attention(d_model=m.d_model, n_heads=m.n_heads, head_dim=m.head_dim, dropout=m.dropout)

    blocks = []
    for layer in plan.layers:
        decoder = layer.stack == "decoder"
        ffn = None if layer.moe is not None else DenseFFN(d_model=m.d_model, d_ff=layer.d_ff, activation=m.activation)
        blocks.append(EncDecBlock(
            attn_norm=norm(), attention=attention(), ffn_norm=norm(), ffn=ffn,
            moe=moe_builder(layer) if layer.moe is not None else None,
            cross_norm=norm() if decoder else None, cross_attention=attention() if decoder else None, dropout=m.dropout,
        ))  # fmt: skip

    def bias(bidirectional):
        return RelativePositionBias(n_heads=m.n_heads, buckets=m.relative_buckets, max_distance=m.relative_max_distance, bidirectional=bidirectional)

    return EncoderDecoderTransformer(
        tok_embeddings=nn.Embedding(m.vocab_size, m.d_model), blocks=blocks, n_encoder_blocks=m.encoder.n_layers,
        encoder_bias=bias(True), decoder_bias=bias(False), encoder_norm=norm(), final_norm=norm(),
        lm_head=None if m.tied_embeddings else nn.Linear(m.d_model, m.vocab_size, bias=False), dropout=m.dropout,
    )  # fmt: skip
