"""The model builder: a resolved `SpecPlan` in, a `MoETransformer` out.

`build_model` is the only place that reads the plan; the modules it makes take plain keyword
arguments. Shape legend: B batch, S sequence, D d_model, V vocabulary.

Initialisation is deterministic for a given seed: the whole build runs under a forked RNG
seeded with `seed` (so the MoE layers' own initialisation is reproducible too, and the
caller's global RNG is left as it was), then the dense weights are re-drawn from
N(0, init_std), with the residual output projections (`o_proj`, `w_down`, the experts'
`w_down`) scaled by 1/sqrt(2 * n_layers) as in GPT-2, so that the residual stream's
variance does not grow with depth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import moespec.model.flops  # noqa: F401  (registers the CPU attention FLOP formulas)
from moespec.model.layers import CausalSelfAttention, DecoderBlock, DenseFFN, RotaryEmbedding, make_norm, run_blocks
from moespec.model.types import ModelAux
from moespec.spec.plan import SpecPlan


class MoETransformer(nn.Module):
    """Decoder-only transformer: embeddings, pre-norm blocks (dense or MoE), final norm, LM head.

    `lm_head=None` ties the output projection to the token embedding (one shared matrix,
    counted once and stored once in the state dict); a tied head's bias, if any, is
    `head_bias` [V] (an untied head keeps its own in `lm_head.bias`).
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Embedding,
        blocks: list[DecoderBlock],
        final_norm: nn.Module,
        lm_head: nn.Linear | None,
        pos_embeddings: nn.Embedding | None = None,
        rope: RotaryEmbedding | None = None,
        dropout: float = 0.0,
        head_bias: nn.Parameter | None = None,
    ):
        super().__init__()
        if (pos_embeddings is None) == (rope is None):
            raise ValueError("give exactly one of pos_embeddings= (learned) or rope=")
        self.tok_embeddings = tok_embeddings
        self.pos_embeddings = pos_embeddings
        self.rope = rope
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.lm_head = lm_head
        if head_bias is not None and lm_head is not None:
            raise ValueError("head_bias= is for a tied head; an untied one carries lm_head.bias")
        self.head_bias = head_bias

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is None

    @property
    def max_seq_len(self) -> int | None:
        """Longest input the learned position table covers; None with RoPE."""
        return None if self.pos_embeddings is None else self.pos_embeddings.num_embeddings

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ModelAux]:
        """tokens [B, S] long -> (logits [B, S, V], ModelAux with the summed MoE aux loss)."""
        B, S = tokens.shape
        positions = torch.arange(S, device=tokens.device)  # [S]
        x = self.tok_embeddings(tokens)  # [B, S, D]
        rope = None
        if self.pos_embeddings is not None:
            if S > self.pos_embeddings.num_embeddings:
                raise ValueError(f"sequence length {S} exceeds the learned position table ({self.pos_embeddings.num_embeddings})")
            x = x + self.pos_embeddings(positions)  # [B, S, D] + [S, D]
        else:
            rope = self.rope.cos_sin(positions)  # ([S, Hd], [S, Hd])
        x = self.embed_dropout(x)

        aux_loss = torch.zeros((), dtype=torch.float32, device=tokens.device)
        stats = []
        x, aux_loss = run_blocks(self.blocks, x, stats, aux_loss, rope=rope, token_ids=tokens)
        x = self.final_norm(x)  # [B, S, D]
        if self.lm_head is None:
            logits = F.linear(x, self.tok_embeddings.weight, self.head_bias)  # [B, S, V]
        else:
            logits = self.lm_head(x)  # [B, S, V]
        return logits, ModelAux(aux_loss=aux_loss, moe=stats)


def build_model(plan: SpecPlan, *, seed: int = 0, device: torch.device | str | None = None,
                expert_shard: tuple[int, int] | None = None) -> MoETransformer:  # fmt: skip
    """Build the model a plan describes. `device="meta"` gives shapes without memory, which
    is how full-size specs (Mixtral, DeepSeek-V3) are built and counted on a laptop.

    expert_shard (ep rank, ep size) builds only that rank's E/ep experts of every MoE layer, each
    with the values the whole model holds (`ExpertBank`): an expert-parallel rank never holds the
    whole bank. Everything else is built whole, as the same seed builds it everywhere."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = _assemble(plan, expert_shard)
        _init_dense_weights(model, std=plan.model.init_std, n_layers=plan.model.total_blocks)
    return model


def _assemble(plan: SpecPlan, expert_shard: tuple[int, int] | None = None) -> MoETransformer:
    m = plan.model
    if m.encoder is not None:
        from moespec.model.encoder_decoder import assemble_encoder_decoder

        return assemble_encoder_decoder(plan, lambda layer: _moe(plan, layer, expert_shard))
    if m.host == "lstm":
        from moespec.model.lstm_host import assemble_lstm

        return assemble_lstm(plan, lambda layer: _moe(plan, layer, expert_shard))
    blocks = [_block(plan, layer, expert_shard) for layer in plan.layers]
    return MoETransformer(
        tok_embeddings=nn.Embedding(m.vocab_size, m.d_model),
        pos_embeddings=nn.Embedding(m.seq_len, m.d_model) if m.positions == "learned" else None,
        rope=RotaryEmbedding(head_dim=m.rope_dim, theta=m.rope_theta) if m.positions == "rope" else None,
        blocks=blocks,
        final_norm=make_norm(m.norm, m.d_model, eps=m.norm_eps, bias=m.norm_bias),
        lm_head=None if m.tied_embeddings else nn.Linear(m.d_model, m.vocab_size, bias=m.lm_head_bias),
        head_bias=nn.Parameter(torch.zeros(m.vocab_size)) if m.lm_head_bias and m.tied_embeddings else None,
        dropout=m.dropout,
    )


def _block(plan: SpecPlan, layer, expert_shard: tuple[int, int] | None = None) -> DecoderBlock:
    m = plan.model
    attention = _attention(m, window=m.window if layer.index in m.window_layers else None)
    if layer.kind == "moe":
        ffn, moe = None, _moe(plan, layer, expert_shard)
    else:
        ffn = DenseFFN(d_model=m.d_model, d_ff=layer.d_ff, activation=m.activation)
        moe = None
    return DecoderBlock(
        attn_norm=make_norm(m.norm, m.d_model, eps=m.norm_eps, bias=m.norm_bias),
        attention=attention,
        ffn_norm=make_norm(m.norm, m.d_model, eps=m.norm_eps, bias=m.norm_bias),
        ffn=ffn,
        moe=moe,
        dropout=m.dropout,
        use_rope=layer.index not in m.nope_layers,
    )


def _moe(plan: SpecPlan, layer, expert_shard: tuple[int, int] | None = None) -> nn.Module:
    from moespec.model.moe_layer import build_moe_layer  # the MoE layer imports routers, experts

    m = plan.model
    return build_moe_layer(layer.moe, d_model=m.d_model, activation=m.activation, layer_index=layer.index, init_std=m.init_std,
                           down_init_std=residual_init_std(m.init_std, m.total_blocks), expert_shard=expert_shard)  # fmt: skip


def _attention(m, *, window: int | None = None) -> nn.Module:
    if m.mla is not None:
        from moespec.model.latent_attention import LatentAttention

        return LatentAttention(
            d_model=m.d_model, n_heads=m.n_heads, q_lora_rank=m.mla.q_lora_rank, kv_lora_rank=m.mla.kv_lora_rank,
            qk_nope_head_dim=m.mla.qk_nope_head_dim, qk_rope_head_dim=m.mla.qk_rope_head_dim, v_head_dim=m.mla.v_head_dim,
            norm=m.norm, norm_eps=m.norm_eps, norm_bias=m.norm_bias, out_bias=m.out_bias, dropout=m.dropout,
        )  # fmt: skip
    return CausalSelfAttention(
        d_model=m.d_model,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        qkv_bias=m.qkv_bias,
        out_bias=m.out_bias,
        qk_norm=m.qk_norm,
        norm=m.norm,
        norm_eps=m.norm_eps,
        norm_bias=m.norm_bias,
        dropout=m.dropout,
        sinks=m.attention_sinks,
        window=window,
    )


def residual_init_std(std: float, n_layers: int) -> float:
    """GPT-2's scaling for projections that write into the residual stream (o_proj, w_down):
    2 * n_layers of them add up, so each gets 1/sqrt(2 * n_layers) of the std."""
    return std / math.sqrt(2 * n_layers)


@torch.no_grad()
def _init_dense_weights(model: MoETransformer, *, std: float, n_layers: int) -> None:
    """N(0, std) for embeddings and dense linears, zero biases; residual output projections
    get std / sqrt(2 * n_layers). MoE layers were initialised by `build_moe_layer` with the
    same two stds (routers keep their own initialisation)."""
    residual_std = residual_init_std(std, n_layers)
    dense_linears: list[tuple[nn.Linear, float]] = []
    for block in model.blocks:
        if getattr(block, "lstm", None) is not None:  # an LSTM host: both projections as input-side weights
            dense_linears += [(block.lstm.ih, std), (block.lstm.hh, std)]
            continue
        inputs = ("q_proj", "k_proj", "v_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
        for att in (block.attention, getattr(block, "cross_attention", None)):  # cross: encoder-decoder blocks
            if att is not None:
                dense_linears += [(getattr(att, name), std) for name in inputs if getattr(att, name, None) is not None]
                dense_linears.append((att.o_proj, residual_std))
        if block.ffn is not None:
            ffn = block.ffn
            dense_linears += [(lin, std) for lin in (ffn.w_gate, ffn.w_up) if lin is not None]
            dense_linears.append((ffn.w_down, residual_std))
    if model.lm_head is not None:
        dense_linears.append((model.lm_head, std))
    for linear, linear_std in dense_linears:
        nn.init.normal_(linear.weight, mean=0.0, std=linear_std)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
    nn.init.normal_(model.tok_embeddings.weight, mean=0.0, std=std)
    if model.pos_embeddings is not None:
        nn.init.normal_(model.pos_embeddings.weight, mean=0.0, std=std)
    for table in (getattr(model, "encoder_bias", None), getattr(model, "decoder_bias", None)):  # T5's relative positions
        if table is not None:
            nn.init.normal_(table.table.weight, mean=0.0, std=std)
