"""Parameter tensors of the built model, by count: each costs AdamW and clipping their
per-tensor ops (sim/ops.py), and ZeRO-1 all-gathers each one after its step (sim/counts.py,
distributed/zero.py). Equal to `len(list(model.parameters()))` (tests/test_op_counts.py)."""

from __future__ import annotations

import numpy as np

from moespec.sim.design import DesignBatch, weighted_qk_norm, where_any


def param_tensors(b: DesignBatch) -> np.ndarray:
    """Parameter tensors of the built model (each one costs AdamW and clipping their ops).
    Booleans count as 0/1; the rarer kinds (MLA, cross-attention, LSTM) only where present."""
    layers = b.table
    norm = 1 + b.norm_bias.astype(np.int64)
    matrices = 2 + b.gated.astype(np.int64)
    # attention Linears: q, k, v, o; MLA: q (or q_a, its norm, q_b), kv_a, its norm, kv_b, o
    attention = where_any(b.mla, lambda: np.where(b.mla, 3 + norm + np.where(b.q_lora_rank > 0, 2 + norm, 1), 4), 4)
    block = attention + 3 * b.qkv_bias + b.out_bias + b.sinks + 2 * norm + 2 * norm * weighted_qk_norm(b)
    shared = layers.shared_count > 0
    moe = layers.lift(matrices) * (1 + shared + layers.expert_bias) + layers.router_matrices + layers.router_bias + layers.selection_bias \
        + (shared & layers.shared_gate)  # fmt: skip
    groups = np.where(layers.moe, moe, layers.lift(matrices)) * (layers.moe | (layers.d_ff > 0))
    block = block + where_any(b.cross_len > 0, lambda: (b.cross_len > 0) * (4 + norm), 0)  # cross-attention's q, k, v, o and norm
    block = where_any(b.lstm, lambda: np.where(b.lstm, 4, block), block)  # an LSTM layer: weight_ih, weight_hh, their biases; no norms
    root = ~b.headless * (2 - b.tied + b.lm_head_bias) + b.learned_positions + (b.rel_buckets > 0) + ~b.lstm * norm
    encoder = 0 if b.encoder is None else param_tensors(b.encoder)
    dense_ffn = matrices * (b.d_ff > 0)  # an LSTM host's plain blocks have no FFN
    return root + b.n_layers * block + b.dense_blocks * dense_ffn + layers.per_design(layers.count * groups, len(b)) + encoder


def trained_tensors(b: DesignBatch) -> np.ndarray:
    """`param_tensors` less the frozen ones (ERNIE's score correction): what clipping and AdamW touch."""
    frozen = sum(part.table.per_design(part.table.count * part.table.selection_bias, len(b)) for part in ([b] if b.encoder is None else [b, b.encoder]))
    return param_tensors(b) - frozen



def expert_tensors(b: DesignBatch) -> np.ndarray:
    """The expert banks' tensors (ZeRO-1's expert group, sharded over dp/ep): each MoE block's
    stacked weights, and gpt-oss's per-expert biases."""
    out = 0
    for part in [b] if b.encoder is None else [b, b.encoder]:
        layers = part.table
        bank = layers.lift(np.where(b.gated, 3, 2)) * (1 + layers.expert_bias)
        out = out + layers.per_design(layers.count * np.where(layers.moe, bank, 0), len(b))
    return out
