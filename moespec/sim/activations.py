"""Activation memory of one micro-step on one rank, counted from what this project's model
keeps for backward, and the peak of a training step built from it.

Why not Korthikanti et al. 2022's 34*s*b*h per block (used before): it describes Megatron's
kernels (dropout masks, unfused attention scores), not ours. On the held-out suite it missed
MemTracker's activations by -50% to +233%. Here every term is a tensor autograd saves in our
model (moespec/model), traced with `saved_tensors_hooks` (tests/test_activation_bytes.py
checks the sum against the trace on a dozen specs):

- a norm keeps its input and, RMSNorm, the normalised product and 1/rms (LayerNorm: input,
  mean and 1/std); residual adds keep nothing;
- a Linear keeps its input once per distinct input tensor; under autocast each Linear casts
  (and keeps) its own bf16 copy of the input and of its weight;
- causal SDPA (fused: no S x S scores) keeps q, k, v, its output and a float32 logsumexp;
- a gated FFN keeps 4 hidden-wide tensors (gate, up, act(gate), their product), plain 2;
- routers keep a few [T, E] float32 tensors and [T, k] indices (ROUTER_SAVED, traced per router);
- capacity experts keep the [E*C, D] buffer and the hidden tensors; the combine keeps the
  expert output and the weighted rows in float32; the dropless kernel keeps its two
  pre-activations [A, F] and the sorted indices and gates;
- the loss keeps log-softmax [T, V] in float32; the logits stay alive in the training loop.

Peak (MemTracker's tracked total): the largest of (a) the start of backward: state, the
gradients of earlier micro-steps (under DDP the dense gradients from the first: its buckets
are held for the whole run), activations, the loss gradients [T, V]; (b) the backward of
the top dropless MoE layer: its expert gradients and the kernel's temporaries on top of
(a)'s activations, less what the dense blocks above the last MoE block kept (their backward
ran first); (b') the backward of the lowest one, where every MoE layer is dropless: every MoE
layer's expert gradients, less what all the blocks above it kept (a spec with dropless blocks
1 and 2 of 6 peaks there: its two layers' expert gradients outweigh block 2's activations);
(c) the gradient sync after backward: state, every gradient, and the flat
copy of the expert gradients all-reduced over a data-parallel group that replicates them
(cost.py).

Tensor parallelism (distributed/tensor_parallel.py): a rank keeps 1/tp of what is per head
(q, k, v, the attention output, logsumexp, QK-norms) and of the split FFNs' hidden tensors;
the split modules' inputs (replicated), norms, routers, routed experts and the loss whole.
Sequence parallelism also cuts the norms and what full recomputation keeps per block (the
block input) to the rank's S/tp slice; the split modules keep their gathered input whole.
Pipeline parallelism: a stage holds its blocks' activations for every micro-batch in flight
(Narayanan et al. 2021; Megatron-LM's theoretical memory): GPipe all m, 1F1B min(m, pp) on
the first stage, interleaved 1F1B that times 1 + (pp - 1) / (pp * v); the blocks counted are
the average stage's (L / pp).
"""

from __future__ import annotations

import numpy as np

from moespec.sim.counts import FULL, QK_L2, QK_PER_HEAD, SELECTIVE, base_padded, compute_bytes, expert_rows, where_any
from moespec.sim.design import PRECISIONS, ROUTER_NAMES, DesignBatch, weighted_qk_norm
from moespec.spec.stages import PP_SCHEDULES

F32, I64 = 4.0, 8.0
# Per router, what it saves per token (traced: tests/test_activation_bytes.py):
# ([T, E] float32 tensors, [T, k] int64, [T, k] float32, [T] float32, [T, k+1] int64,
#  [T, E] float32 per choice: SparseMixer's softmax and its bool mask for each of the k).
ROUTER_SAVED = {
    "topk": (2, 1, 1, 2, 0, 0),
    "switch": (2, 1, 0, 1, 0, 0),
    "noisy_topk": (8.25, 1, 1, 1, 1, 0),  # 8 [T, E] float32 and a [T, E] bool mask
    "sinkhorn": (2, 1, 0, 1, 0, 0),
    "expert_choice": (2, 0, 0, 1, 0, 0),  # plus its [E, C] indices: counted with the dispatch
    "sigmoid_bias": (1, 1, 1, 1, 0, 0),
    "hash": (0, 1, 0, 1, 0, 0),
    "base": (1, 1, 0, 1, 0, 0),
    "sparsemixer": (2, 1, 1, 1, 0, 1.25),  # fitted on k 1-3, E 4-8 (tiny-topk's shape)
}


_ROUTER_TABLE = np.array([ROUTER_SAVED[name] for name in ROUTER_NAMES], dtype=np.float64)  # rows by router code


def _latent_attention(b: DesignBatch, t, td, c, half) -> np.ndarray:
    """What MLA keeps per block (model/latent_attention.py): x for its two input Linears; each
    latent norm its input, statistic and product, and the next Linear its output; q and k
    (concatenated), v (padded to their width), SDPA's output and logsumexp, and o_proj's
    input (a copy: SDPA's output keeps the [B, H, S] layout of the concatenated q)."""
    if not b.mla.any():
        return np.zeros(len(b))
    heads, hd = b.n_heads.astype(np.float64), b.head_dim.astype(np.float64)
    rq, rkv, rope, vd = (x.astype(np.float64) for x in (b.q_lora_rank, b.kv_lora_rank, b.qk_rope_dim, b.v_head_dim))

    def latent_norm(width):  # in float32 (norm_in_fp32), then its output in the compute dtype for the next Linear
        kept = np.where(b.layernorm, t * width * F32 + 2 * t * F32, 2 * t * width * F32 + t * F32)
        return kept + t * width * c

    inputs = np.where(half, 2 * td * 2, td * F32)
    q_side = np.where(rq > 0, latent_norm(rq), 0.0)
    kv_side = latent_norm(rkv) + np.where(half, 0.0, t * rope * F32)  # fp32: the norm's input is a view of kv_a's output
    lse = b.micro_batch * b.n_heads * b.seq_len * F32
    width = np.maximum(hd, vd)  # q, k and v padded to one width for the fused kernel
    padded = np.where(vd < hd, t * heads * width, t * heads * (hd - rope + vd))  # v: its padded copy, or a view of kv_b's output
    core = (2 * t * heads * width + padded + t * heads * width + t * heads * vd) * c
    core = core + np.where(b.recompute == SELECTIVE, 0.0, lse)  # q, k, v, output (and o_proj's input when sliced), logsumexp
    return inputs + q_side + kv_side + core


def activation_memory(b: DesignBatch, weights_bytes: np.ndarray) -> dict[str, np.ndarray]:
    """Bytes per design on one rank: `activations` (held at the end of one micro-step's
    forward: what autograd saved, and the logits the loop holds), `saved` (autograd's part
    alone: tests/test_activation_bytes.py), `loss_temporaries` (the loss gradients at the start
    of backward), `moe_temporaries` (the largest dropless layer's backward temporaries).
    weights_bytes: the rank's parameter bytes (autocast copies the matmuls' weights)."""
    layers = b.table
    n = len(b)
    c = compute_bytes(b).astype(np.float64)
    half = b.precision != PRECISIONS.index("fp32")
    t = (b.micro_batch * b.seq_len).astype(np.float64)
    d = b.d_model.astype(np.float64)
    hq, hkv = (b.n_heads * b.head_dim).astype(np.float64), (b.n_kv_heads * b.head_dim).astype(np.float64)
    td = t * d

    tp = b.tp.astype(np.float64)
    seq = np.where(b.sequence_parallel & (b.tp > 1), tp, 1.0)  # the rank's share of the sequence between split modules
    norm = where_any(b.lstm, 0.0, np.where(b.layernorm, td * F32 + 2 * t * F32, 2 * td * F32 + t * F32))  # an LSTM host has no norms
    attn_inputs = np.where(half, 3 * td * 2, td * F32)
    core = (2 * t * hq + 2 * t * hkv) * c + b.micro_batch * b.n_heads * b.seq_len * F32
    core = np.where(b.recompute == SELECTIVE, core - b.micro_batch * b.n_heads * b.seq_len * F32, core)
    # Partial RoPE concatenates q and k in [B, H, S] order, so SDPA's output comes out in that
    # layout too and o_proj's input is a copy of it (full RoPE keeps q's [B, S, H] layout).
    core = core + where_any((b.rope_dim > 0) & (b.rope_dim < b.head_dim), lambda: t * hq * c, 0.0)
    # T5's relative bias (model/encoder_decoder.py) sends SDPA down its math path: no
    # logsumexp, the probabilities [B, H, S, S] instead (float32 from autocast's softmax, and
    # their copy in the compute dtype for the values' matmul), o_proj's input a copy.
    # Dropout sends it there too (the fused CPU kernel has none): then the float32 mask and
    # the dropped probabilities (in the compute dtype, for the values' matmul) besides.
    drop = b.dropout > 0
    probabilities = where_any(drop, 3 * F32, F32)  # bytes per score (the math path computes in float32)

    def math_core():  # under autocast the math path upcasts: q, k and v kept in float32, o_proj's input in the compute dtype
        s2 = b.micro_batch * b.n_heads * b.seq_len.astype(np.float64) ** 2
        return np.where(half, (t * hq + 2 * t * hkv) * F32 + t * hq * c, (2 * t * hq + 2 * t * hkv) * c) + s2 * probabilities

    math_path = (b.rel_buckets > 0) | drop
    if math_path.any():
        core = np.where(math_path & ~b.sinks & ~b.mla, math_core(), core)
    # QK-norm (in float32): each of q and k keeps its input and, RMSNorm, the normalised
    # product, with one statistic per row (per token, or per token and head).
    def qk_norms():
        qk_width = t * (hq + hkv)
        qk_rows = np.where(b.qk_norm == QK_PER_HEAD, t * (b.n_heads + b.n_kv_heads), 2 * t)
        return np.where(b.layernorm, qk_width * F32 + 2 * qk_rows * F32, 2 * qk_width * F32 + qk_rows * F32) / tp
    # Attention sinks (layers.py AttentionCore): SDPA keeps q and k, v with a channel and
    # (k, v) a key more, its output a channel wider, the mask as floats [S, 1+S] (the compute
    # dtype's); o_proj's
    # input is a copy of the output's first head_dim channels.
    s = b.seq_len.astype(np.float64)

    def sink_core():
        kv_rows = b.micro_batch * (s + 1) * b.n_kv_heads
        kept = (2 * t * b.n_heads * (b.head_dim + 1) + 2 * kv_rows * (b.head_dim + 1) + t * hq) * c + b.micro_batch * b.n_heads * s * F32
        return kept / tp + s * (s + 1) * c

    core = where_any(b.sinks, sink_core, core / tp)  # per head: a tp rank's heads (the sinks' mask whole)
    attention = 2 * norm / seq + where_any(b.mla, lambda: _latent_attention(b, t, td, c, half), attn_inputs + core) \
        + where_any(weighted_qk_norm(b), qk_norms, 0.0)  # both norms of the block  # fmt: skip
    # An LSTM layer (model/lstm_host.py) keeps per step its four gate activations, the cell
    # state and tanh of it in float32, and the output as the next step's recurrent input (in
    # the compute dtype); and its input for the input projection.
    attention = where_any(b.lstm, lambda: 6 * t * d * F32 + (b.seq_len - 1) * b.micro_batch * d * c + td * c, attention)
    inputs = np.where(b.gated, 2, 1)
    hidden = np.where(b.gated, np.where(b.clamped, 7, 4), np.where(b.relu, 1, 2))  # autograd's hidden-wide tensors (clamped SwiGLU: its clamps and sigmoid too; relu: its output alone)

    def ffn_in(code_half, count_inputs, tdl):  # what a FFN keeps of its input
        return np.where(code_half, count_inputs * tdl * 2, tdl * F32)

    dense = where_any(b.lstm, 0.0, ffn_in(half, inputs, td) + hidden * t * b.d_ff * c / tp)  # an LSTM host's blocks have no FFN

    # MoE groups
    tl, dl, cl, hl = layers.lift(t), layers.lift(d), layers.lift(c), layers.lift(half)
    il, kl = layers.lift(inputs), layers.lift(hidden)
    k = layers.k.astype(np.float64)
    e = layers.experts.astype(np.float64)
    r = _ROUTER_TABLE[layers.router]
    router = np.where(layers.router_matrices > 0, tl * dl * F32, 0.0)
    router = router + tl * (r[:, 0] * e * F32 + r[:, 1] * k * I64 + r[:, 2] * k * F32 + r[:, 3] * F32 + r[:, 4] * (k + 1) * I64
                            + r[:, 5] * k * e * F32)  # fmt: skip
    rows = expert_rows(b, layers).astype(np.float64)  # R = E*C (capacity) or A = T*k (dropless)
    ep = layers.lift(b.ep)
    f = layers.expert_d_ff.astype(np.float64)
    capacity = tl * k * I64 + (rows + 1) * (I64 + F32) + rows * dl * cl + kl * rows * f * cl + 2 * rows * dl * F32
    dropless = 2 * rows * I64 + rows * F32 + np.where(layers.lift(b.gated), 2, 1) * rows * f * cl  # the kernel's pre-activations
    dropless = dropless + np.where(layers.expert_bias, rows * I64, 0.0)  # the expert of each row, for the biases
    dropless = dropless + np.where(layers.router_matrices > 0, 0.0, tl * dl * F32)  # hash: the kernel keeps x itself
    dropless = dropless + np.where(ep > 1, rows * dl * cl + 2 * rows * dl * F32, 0.0)  # received rows, the combine
    dropless = dropless + np.where(base_padded(b, layers), tl * I64, 0.0)  # pad_groups' row positions, for the gates' gradient
    experts = np.where(layers.dropless, dropless, capacity)
    fs = (layers.shared_count * layers.shared_d_ff).astype(np.float64)
    tpl = layers.lift(tp)
    shared = np.where(fs > 0, np.where(hl, il * tl * dl * 2, 0.0) + kl * tl * fs * cl / tpl + np.where(layers.shared_gate, 2 * tl * F32, 0.0), 0.0)
    # gate_input (Llama-4): the tokens scaled by their gate, in float32 (the norm's output is float32 under autocast too)
    gated_in = tl * dl * F32 + tl * F32
    moe_ffn = router + experts + shared + np.where(layers.gate_input, gated_in, 0.0)
    dense_group = np.where(layers.d_ff > 0, ffn_in(hl, il, tl * dl) + kl * tl * layers.d_ff * cl / tpl, 0.0)
    per_group = np.where(layers.moe, moe_ffn, dense_group)
    # Cross-attention (decoder blocks of an encoder-decoder): its norm; q's input (fp32: the
    # encoder's output, k and v's input, is one tensor all blocks share; autocast casts it per
    # Linear); fused SDPA's q, k, v, output and logsumexp.
    crossing = b.cross_len > 0
    t_enc = (b.micro_batch * b.cross_len).astype(np.float64) if crossing.any() else 0.0

    def cross():
        scores = b.n_heads * b.seq_len * t_enc
        return norm + np.where(half, td * 2 + 2 * t_enc * d * 2, td * F32) + (2 * t * hq + 2 * t_enc * hq) * c \
            + np.where(drop, scores * probabilities, b.micro_batch * b.n_heads * b.seq_len * F32)  # dropout: the math path  # fmt: skip

    attention = attention + where_any(crossing, cross, 0.0)
    blocks = b.n_layers * attention + b.dense_blocks * dense + layers.per_design(layers.count * per_group, n)
    blocks = blocks + np.where(b.sinks, 0.0, b.window_layers * s * s * c)  # each windowed layer's mask, as floats of the compute dtype
    # Llama-4's weightless QK-norm, in the layers with RoPE: q and k in float32 and 1/rms per head
    l2 = (t * (hq + hkv) + t * (b.n_heads + b.n_kv_heads)) * F32
    blocks = blocks + np.where(b.qk_norm == QK_L2, (b.n_layers - b.nope_layers) * l2 / tp, 0.0)
    block_input = b.n_layers * td * F32 / seq  # what full recomputation keeps per block
    biggest_block = attention + np.maximum(np.where(b.dense_blocks > 0, dense, 0.0), layers.max_per_design(np.where(layers.count > 0, per_group, 0.0), n))
    # pipeline: the average stage's blocks, for each micro-batch in flight (module docstring)
    micro = (b.global_batch // (b.micro_batch * b.dp)).astype(np.float64)
    pp = b.pp.astype(np.float64)
    flight = np.where(b.pp_schedule == PP_SCHEDULES.index("gpipe"), micro, np.minimum(micro, pp))
    flight = np.where(b.pp_schedule == PP_SCHEDULES.index("interleaved_1f1b"), flight * (1 + (pp - 1) / (2 * pp)), flight)
    flight = np.where(b.pp > 1, flight, 1.0)
    blocks = np.where(b.recompute == FULL, block_input / pp * flight + biggest_block, blocks / pp * flight)
    if drop.any():  # dropout's masks: the embedding's and a T5 stack's final one in float32, two per block (three with cross-attention) in the compute dtype
        masks = (1 + (b.rel_buckets > 0)) * F32 + b.n_layers * np.where(b.cross_len > 0, 3, np.where(b.lstm, 1, 2)) * c + np.where(b.lstm, b.n_moe_layers * c, 0.0)
        blocks = blocks + np.where(drop, masks * td, 0.0)

    v = b.vocab.astype(np.float64)
    rope = 2 * b.seq_len * b.rope_dim * F32  # the cos and sin tables
    head = norm + np.where(half, td * 2, td * F32) + t * v * F32 + 2 * t * I64 + rope
    # Relative positions: the bucket of each (query, key) pair, int64, for the bias table's
    # gradient; a decoder's causal mask (bool). The encoder's output once, k and v's input.
    relative = where_any(b.rel_buckets > 0, lambda: s * s * I64 + np.where(b.headless, 0.0, s * s), 0.0)
    if crossing.any():  # the encoder's output (full recomputation keeps it as every block's input)
        head = head + np.where(crossing & (~half | (b.recompute == FULL)), t_enc * d * F32, 0.0)
    head = head + relative
    head = where_any(b.headless, lambda: norm + t * I64 + relative, head)  # an encoder: its final norm, its tokens
    logits = where_any(b.headless, 0.0, t * v * c)  # alive in the training loop
    # autocast's bf16 copies of the matmuls' weights, kept for backward; an untied embedding
    # table is looked up, not cast. Full recomputation keeps a block's only while it replays.
    embedding = np.where(b.tied, 0.0, v * d * F32)
    head_copy = v * d * 2
    block_copies = np.maximum(weights_bytes - embedding - head_copy * 2, 0.0) / 2
    all_blocks = b.n_layers + (0 if b.encoder is None else b.encoder.n_layers)
    block_copies = np.where(b.recompute == FULL, block_copies / np.maximum(all_blocks / b.pp, 1), block_copies)
    copies = np.where(half, head_copy + block_copies, 0.0)
    copies = where_any(b.headless, 0.0, copies)  # a headless part's weights: the main part's copies
    activations = blocks + head + logits + copies

    # The top dropless layer's backward: its kernel's temporaries (the gathered output
    # gradient, hidden-wide gradients, the input gradient) while its expert gradients are
    # made whole at once. Capacity layers run autograd's per-op backward, which frees saved
    # tensors as it makes gradients: their peak stays the start of backward (MemTracker).
    temp = rows * dl * cl + 3 * rows * f * cl + tl * dl * F32
    moe_temp = layers.max_per_design(np.where(layers.moe & layers.dropless & (layers.count > 0), temp, 0.0), n)  # whole on every tp rank
    # By then the dense blocks above the last MoE block have run their backward and freed what
    # they kept (a BASE layer in the middle: half the blocks). Counted for one stage and no
    # full recomputation, in a decoder-only model; elsewhere none (an upper bound).
    simple = (b.recompute != FULL) & (b.pp == 1) & (b.cross_len == 0) & ~b.headless & (b.encoder is None)
    # With autocast each block's bf16 weight copies go too (its attention's: what is left of
    # the blocks' copies once the FFNs' are taken out).
    dense_copy = moe_copy = attention_copy = 0.0
    if half.any():
        matrices_d = np.where(b.gated, 3.0, 2.0) * d
        dense_copy = half * (matrices_d * b.d_ff * 2 / tp)
        moe_copy = (hl & layers.moe) * (layers.lift(2 * matrices_d) * (layers.experts // layers.lift(b.ep) * layers.expert_d_ff
                                                                       + layers.shared_count * layers.shared_d_ff / layers.lift(tp)))  # fmt: skip
        ffn_copies = b.dense_blocks * dense_copy + layers.per_design(layers.count * moe_copy, n)
        attention_copy = half * np.maximum(block_copies - ffn_copies, 0.0) / np.maximum(b.n_layers, 1)
    block_attention, block_ffn = attention + attention_copy, dense + dense_copy
    freed_above = simple * (b.above_top_moe * (block_attention + block_ffn))
    # The first (lowest) MoE layer's backward: every block above it has freed its part too:
    # the attention of every block from it to the last MoE block, the other MoE blocks' FFNs
    # (in unlike groups, all but the largest: an upper bound) and the dense FFNs between them.
    # Counted where every MoE layer is dropless (sim/memory.py).
    moe_blocks = (layers.moe & (layers.count > 0)) * (per_group + moe_copy)
    other_moe = layers.per_design(layers.count * moe_blocks, n) - layers.max_per_design(moe_blocks, n)
    between = np.maximum(b.moe_span - (b.n_moe_layers - 1), 0)  # dense blocks among the MoE ones
    freed_above_bottom = freed_above + simple * (b.moe_span * block_attention + between * block_ffn + other_moe)
    all_dropless = layers.max_per_design(layers.moe & (layers.count > 0) & ~layers.dropless, n) == 0
    loss_temporaries = where_any(b.headless, 0.0, 2 * t * v * F32 + np.where(half, t * v * 2, 0.0))
    parted = b.encoder is not None or b.headless.any()  # an encoder-decoder's parts: one block replays at a time in the two
    replay = np.where(b.recompute == FULL, biggest_block, 0.0) / (b.tp * b.pp) if parted else 0.0
    out = {"activations": activations, "saved": activations - logits, "loss_temporaries": loss_temporaries, "moe_temporaries": moe_temp,
           "replay": replay, "freed_above_top_moe": freed_above, "freed_above_bottom_moe": freed_above_bottom,
           "bottom_moe_point": simple & (b.n_moe_layers > 1) & all_dropless}  # fmt: skip
    if b.encoder is not None:  # an encoder-decoder: the encoder stack's part is held too; one block replays at a time
        encoder = activation_memory(b.encoder, np.zeros(n))
        once = np.minimum(replay, encoder["replay"])
        out = {name: (np.maximum if name in ("moe_temporaries", "replay", "freed_above_top_moe", "freed_above_bottom_moe", "bottom_moe_point") else np.add)(value, encoder[name]) for name, value in out.items()}
        out["activations"], out["saved"] = out["activations"] - once, out["saved"] - once
    return out
