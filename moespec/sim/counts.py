"""Exact counts of the compiled model's training step, for a batch of designs (REFERENCE sec. 4).

These are the figures the runtime is held to, exactly: parameters (`sum(p.numel())` of the
built module), matmul FLOPs of one micro-step on one rank (what FlopCounterMode reports,
recomputed forwards and capacity padding included), bytes one rank sends to the others by
all-to-all (expert dispatch and combine; BASE's token shuffle apart), bytes of parameters,
gradients and optimizer state one rank holds under its ZeRO stage, and all-to-all calls.
int64 (exact) or float64 (`dtype`, the overflow-safe twin); no torch.

Conventions they mirror (the compiled model's, see moespec/model and moespec/distributed):
- a Linear of `i` inputs and `o` outputs on N rows: 2*N*i*o forward, 4*N*i*o backward (every
  matmul input requires grad: the embedding is trainable), 6*N*i*o per step;
- attention scores and values: 4*B*H*S^2*hd forward, 8*B*H*S^2*hd backward (causal masking,
  and a sliding window's, does not discount them; attention sinks add a key and a channel:
  S*(S+1)*(hd+1)); under MLA hd is the wider of the query/key and value widths, to
  which the model pads them (model/latent_attention.py);
- experts with capacity run on the fixed [E, C, D] buffer (E*C rows, padding included);
  dropless experts on the T*k routed rows;
- recompute "selective" replays each attention core's forward (+4*B*H*S^2*hd per block),
  "full" every block's whole forward (+1/3 of the block's step FLOPs), and with it the MoE
  layer's all-to-alls (6 transfers per layer per micro-step instead of 4);
- dispatch moves rows in the compute dtype (2 bytes under bf16/fp16 autocast, 4 in fp32);
- parameters and gradients are fp32 at every precision (autocast keeps fp32 master weights),
  AdamW holds m and v in fp32 (8 bytes; its scalar step counters are not counted). ZeRO
  shards a parameter by rows, FSDP2's Shard(0): over W ranks the largest share is
  ceil(dim0 / W) rows. Dense parameters shard over dp, expert banks ([E/ep, D, F]) over
  dp/ep, by expert unless E/ep < dp/ep, then by their second dim (torchtitan's placement).
  Stage 1 shards optimizer state, 2 and 3 (FSDP2) parameters, gradients and state;
- collective calls: all-to-alls per micro-step (with dropless layers' split exchanges) and
  ZeRO's all-gathers and reduce-scatters per step, as the dispatcher counts them.

Shape legend: N designs, M layer groups (design.py); B micro-batch, S sequence, T = B*S, D
d_model, H heads, KV kv heads, hd head dim, F widths, E experts, k per token, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moespec.sim.design import PRECISIONS, QK_NORMS, RECOMPUTE, DesignBatch, LayerTable, where_any
from moespec.spec.plan import SpecPlan

FULL, SELECTIVE = RECOMPUTE.index("full"), RECOMPUTE.index("selective")
QK_FULL, QK_PER_HEAD, QK_L2 = QK_NORMS.index("full"), QK_NORMS.index("per_head"), QK_NORMS.index("l2")
EXACT_LIMIT = 2.0**62  # int64 counts at or above this are returned as float64


def compute_bytes(b: DesignBatch) -> np.ndarray:
    """Bytes per element of activations and dispatched rows: 4 in fp32, 2 under autocast."""
    return np.where(b.precision == PRECISIONS.index("fp32"), 4, 2)


def a2a_transfers(b: DesignBatch) -> np.ndarray:
    """All-to-all transfers per MoE layer per micro-step: dispatch and combine, forward and
    backward, plus the forward's two again when full recomputation replays it."""
    return np.where(b.recompute == FULL, 6, 4)


def expert_rows(b: DesignBatch, layers: LayerTable) -> np.ndarray:
    """Rows a group's experts compute on per routing group of T tokens (int64, per group)."""
    return b.expert_rows if layers is b.table else capacity_rows(b, layers)


def capacity_rows(b: DesignBatch, layers: LayerTable) -> np.ndarray:
    """E*C rows with capacity C = max(ceil(k*T/E*cf), min_capacity) (CapacityPlan.capacity),
    T*k dropless, E*ceil(T/E) where BASE pads its groups (`base_padded`), per group."""
    t_k = layers.lift(b.micro_batch * b.seq_len) * layers.k
    capacity = np.maximum(np.ceil(t_k / layers.experts * layers.capacity_factor), layers.min_capacity)
    dropless = np.where(base_padded(b, layers), layers.experts * np.ceil(t_k / np.maximum(layers.experts, 1)).astype(np.int64), t_k)
    return np.where(layers.dropless, dropless, layers.experts * np.where(layers.dropless, 0, capacity).astype(np.int64))


def base_padded(b: DesignBatch, layers: LayerTable) -> np.ndarray:
    """Per group: a BASE layer on one rank (ep 1) whose T tokens do not divide over its E
    experts. Its groups are padded back to ceil(T/E) rows each with gate 0, to run as one bmm
    (model/moe_layer.py `pad_groups`): the experts compute E*ceil(T/E) rows."""
    t = layers.lift(b.micro_batch * b.seq_len)
    return layers.moe & layers.balanced & (layers.lift(b.ep) == 1) & (t % np.maximum(layers.experts, 1) != 0)


def _chunk(rows, width, ranks):
    """Elements of the largest Shard(0) share of a [rows, width] parameter over `ranks`, in
    float64: ceil of a float quotient of integers below 2**52 is exact (a quotient that is
    not an integer is at least 1/ranks away from one), and ~10x faster than integer //."""
    return np.ceil(rows / ranks) * width


TP_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")  # tensor parallelism's, as counts name them: tp_<kind>_calls/bytes


def _exact_div(a, b):
    """a / b for a multiple of b: a float division is exact then (below 2**53), and ~40x
    faster than numpy's float floor-divide; integers divide as integers."""
    return a // b if np.issubdtype(np.asarray(a).dtype, np.integer) else a / b


def attention_linears(b: DesignBatch, dtype=np.int64) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(inputs, outputs, present) of each Linear of one block's attention, as arrays over
    designs: q, k, v, o, or under MLA q (or q_a and q_b), kv_a, kv_b, o. `present` masks the
    ones a design lacks (MLA's bottleneck without q_lora_rank; the other kind's)."""
    c = lambda x: np.asarray(x).astype(dtype)  # noqa: E731
    d, heads, hd = c(b.d_model), c(b.n_heads), c(b.head_dim)
    q_width, kv_width = heads * hd, c(b.n_kv_heads) * hd
    mla, rq, rkv, rope, vd = b.mla, c(b.q_lora_rank), c(b.kv_lora_rank), c(b.qk_rope_dim), c(b.v_head_dim)
    std, bottleneck = ~mla, mla & (b.q_lora_rank > 0)
    linears = [(d, q_width, ~bottleneck), (heads * vd, d, np.ones(len(b), dtype=bool))]  # q_proj (both kinds), o_proj
    if std.any():
        linears += [(d, kv_width, std), (d, kv_width, std)]  # k_proj, v_proj
    if mla.any():  # q_a_proj, q_b_proj; kv_a_proj_with_mqa, kv_b_proj
        linears += [(d, rq, bottleneck), (rq, q_width, bottleneck), (d, rkv + rope, mla), (rkv, heads * (hd - rope + vd), mla)]
    return linears


def attention_matmul_elements(b: DesignBatch, dtype=np.int64) -> np.ndarray:
    """Sum of inputs x outputs over one block's attention Linears (its weights, and its
    matmul FLOPs per row / 2)."""
    return sum(np.where(present, i * o, 0) for i, o, present in attention_linears(b, dtype))


def counts(b: DesignBatch, dtype=np.int64) -> dict[str, np.ndarray]:
    """Every exact figure for every design, (N,) arrays in `dtype`. Table groups need no
    masks: their placeholders zero every term of the other kind of block (design.py)."""
    n, layers = len(b), b.table
    lift, count = layers.lift, layers.count.astype(dtype)

    def c(x):
        return x.astype(dtype)

    def total(per_layer):  # a per-group, per-block figure summed over each design's blocks
        return layers.per_design(per_layer * count, n)

    d, v, s, hd, heads = c(b.d_model), c(b.vocab), c(b.seq_len), c(b.head_dim), c(b.n_heads)
    n_layers, n_dense = c(b.n_layers), c(b.dense_blocks)
    q_width, kv_width = heads * hd, c(b.n_kv_heads) * hd
    per_norm = where_any(b.lstm, 0, np.where(b.norm_bias, 2, 1)).astype(dtype)  # weight, and LayerNorm's bias unless dropped; an LSTM host has none
    norm = per_norm * d
    qk_norm = per_norm * np.where(b.qk_norm == QK_FULL, q_width + kv_width, np.where(b.qk_norm == QK_PER_HEAD, 2 * hd, 0))
    matrices_n = np.where(b.gated, 3, 2).astype(dtype)
    dl, matrices = lift(d), lift(matrices_n)
    e, f, k = c(layers.experts), c(layers.expert_d_ff), c(layers.k)

    # Parameters (the built module's, REFERENCE sec. 4): blocks' attention and norms, dense
    # FFNs (per design in a uniform batch, groups otherwise), routers, shared and routed experts.
    latent_norms = per_norm * np.where(b.mla, c(b.kv_lora_rank) + c(b.q_lora_rank), 0)  # MLA's q_a and kv_a norms
    attn_matmul = where_any(b.lstm, 0, attention_matmul_elements(b, dtype))
    # an LSTM layer instead: weight_ih, weight_hh [4D, D] and their biases
    attention = where_any(b.lstm, lambda: 8 * d * d + 8 * d, 0) + attn_matmul + np.where(b.qkv_bias, q_width + 2 * kv_width, 0) \
        + np.where(b.out_bias, d, 0) + qk_norm + latent_norms + np.where(b.sinks, heads, 0)  # fmt: skip
    dense_ffn_n = matrices_n * d * c(b.d_ff)  # one dense block's FFN (uniform batches)
    one_expert = matrices * dl * f  # its weights (matmul FLOPs follow these)
    expert_bias = np.where(layers.expert_bias, (matrices - 1) * f + dl, 0)  # gpt-oss: [F] per input projection, [D] down
    dense_ffn = matrices * dl * c(layers.d_ff)
    shared = c(layers.shared_count) * matrices * dl * c(layers.shared_d_ff) + np.where((layers.shared_count > 0) & layers.shared_gate, dl, 0)
    router = dl * e * c(layers.router_matrices) + np.where(layers.router_bias, e, 0) + np.where(layers.selection_bias, e, 0)
    # cross-attention (decoder blocks of an encoder-decoder): its norm and q, k, v, o of width H*hd
    crossing = b.cross_len > 0
    cross = where_any(crossing, lambda: 4 * d * q_width + norm, 0)
    per_design = n_layers * (attention + 2 * norm + cross) + n_dense * dense_ffn_n
    positions = np.where(b.learned_positions, s * d, 0) + where_any(b.rel_buckets > 0, lambda: c(b.rel_buckets) * heads, 0)  # a learned table, or T5's bias tables
    embedding = where_any(b.headless, 0, v * d) + positions  # an encoder part looks up the decoder's table
    outer = embedding + np.where(b.tied | b.headless, 0, v * d) + np.where(b.lm_head_bias, v, 0) + norm + per_design
    non_routed = dense_ffn + shared + router
    expert_params = total(e * (one_expert + expert_bias))
    params_total = outer + total(non_routed) + expert_params
    params_active = outer + total(non_routed + k * (one_expert + expert_bias))

    # Matmul FLOPs of one micro-step on one rank, by part: 6 per weight per row of a Linear.
    batch = c(b.micro_batch)
    t = batch * s
    tl = lift(t)
    core = 12 * batch * heads * s**2 * np.maximum(hd, c(b.v_head_dim))  # scores and values, fwd + bwd (MLA: padded to one width)
    core = np.where(b.sinks, 12 * batch * heads * s * (s + 1) * (hd + 1), core)  # the sink: one more key and channel
    core = where_any(b.lstm, 0, core)
    # an LSTM layer: every step's input projection, and the recurrent one from the second step on (h_0 = 0)
    recurrence = where_any(b.lstm, lambda: 6 * t * d * 4 * d + 6 * (s - 1) * batch * d * 4 * d, 0)
    rows_int = expert_rows(b, layers)
    expert_flops = 6 * c(rows_int) * one_expert
    dropless = layers.dropless
    s_enc = c(b.cross_len)

    def cross_flops():  # q, o on decoder rows; k, v on encoder rows; the decoder's queries over the encoder's keys
        return 6 * (t + batch * s_enc) * 2 * d * q_width + 12 * batch * heads * s * s_enc * hd

    parts = {
        "attention": n_layers * (6 * t * attn_matmul + core),
        "lstm": n_layers * recurrence,
        "cross_attention": n_layers * where_any(crossing, cross_flops, 0),
        "dense_ffn": n_dense * 6 * t * dense_ffn_n + total(6 * tl * dense_ffn),
        "router": total(6 * tl * dl * e * c(layers.router_matrices)),
        "experts_capacity": total(np.where(dropless, 0, expert_flops)),
        "experts_dropless": total(np.where(dropless, expert_flops, 0)),
        "shared_experts": total(6 * tl * shared),
        "lm_head": where_any(b.headless, 0, 6 * t * d * v),
    }
    blocks = sum(value for name, value in parts.items() if name != "lm_head")
    parts["recompute"] = np.where(b.recompute == FULL, _exact_div(blocks, 3),
                                  np.where(b.recompute == SELECTIVE, n_layers * _exact_div(core, 3), 0))  # fmt: skip
    step_flops = sum(parts.values())

    # Tensor parallel (distributed/tensor_parallel.py): a rank holds and computes 1/tp of the
    # attention (heads divide by tp), and ceil(F/tp) of each dense or shared FFN's width
    # (DTensor's uneven Shard on the largest rank); router, routed experts, norms, embeddings
    # and head are whole on every tp rank. `tp_saved_*`: what the largest rank does not hold or run.
    tp = c(b.tp)
    if (b.tp > 1).any():
        tpl = lift(tp)
        narrow = lambda width: width - (width + tpl - 1) // tpl  # noqa: E731  (F - ceil(F/tp))
        attn_split = attn_matmul + np.where(b.qkv_bias, q_width + 2 * kv_width, 0) + np.where(b.sinks, heads, 0)
        attn_saved = _exact_div(attn_split * (tp - 1), tp)
        dense_narrow = n_dense * matrices_n * d * (c(b.d_ff) - (c(b.d_ff) + tp - 1) // tp)
        group_narrow = matrices * dl * (narrow(c(layers.d_ff)) + narrow(c(layers.shared_count) * c(layers.shared_d_ff)))  # per block of a group
        tp_saved_params = n_layers * attn_saved + dense_narrow + total(group_narrow)
        attn_flops_saved = n_layers * _exact_div((6 * t * attn_matmul + core) * (tp - 1), tp)
        tp_saved_flops = attn_flops_saved + 6 * t * dense_narrow + total(6 * tl * group_narrow)
        replayed = np.where(b.recompute == FULL, _exact_div(tp_saved_flops, 3),
                            np.where(b.recompute == SELECTIVE, n_layers * _exact_div(core * (tp - 1), 3 * tp), 0))  # fmt: skip
        tp_saved_flops = tp_saved_flops + replayed
        # Collectives per micro-step; bytes are what a rank contributes (an all-gather its slice).
        # Split modules (attention in every block, dense FFNs, shared experts) all-reduce once
        # forward (again in a full replay) and once backward. Under sequence parallelism the
        # sequence-sharded ones (attention, dense FFNs) all-gather their input and
        # reduce-scatter their output forward, and the reverse backward; a MoE block
        # all-gathers its input forward and its output's gradient backward; the final norm's
        # input (forward) and the first block's input gradient (backward) are gathered once.
        # Forward: a row-parallel output in the compute dtype, a norm's output float32;
        # backward: a row-parallel output's gradient in the compute dtype, the rest float32.
        dense_groups = total(c(~layers.moe & (layers.d_ff > 0)))
        shared_groups = total(c(layers.moe & (layers.shared_count > 0)))
        sequence = (b.tp > 1) & b.sequence_parallel
        seq_split = n_layers + n_dense + dense_groups
        moe_blocks = total(c(layers.moe))
        forwards = 1 + (b.recompute == FULL)
        rows, cb = t * d, c(compute_bytes(b))
        reduced = np.where(sequence, shared_groups, seq_split + shared_groups)
        tp_all_reduces = np.where(b.tp > 1, (forwards + 1) * reduced, 0)
        tp_all_reduce_bytes = np.where(b.tp > 1, reduced * rows * (forwards * cb + 4), 0)
        tp_all_gathers = np.where(sequence, (forwards + 1) * (seq_split + moe_blocks) + 2, 0)
        tp_all_gather_bytes = np.where(sequence, (seq_split * (4 * forwards + cb) + moe_blocks * 4 * (forwards + 1) + 8) * _exact_div(rows, tp), 0)
        tp_reduce_scatters = np.where(sequence, (forwards + 1) * seq_split, 0)
        tp_reduce_scatter_bytes = np.where(sequence, seq_split * rows * (forwards * cb + 4), 0)
    else:
        tp_saved_params = tp_saved_flops = tp_all_reduces = tp_all_reduce_bytes = np.zeros(n, dtype=dtype)
        tp_all_gathers = tp_all_gather_bytes = tp_reduce_scatters = tp_reduce_scatter_bytes = tp_all_reduces

    # All-to-all bytes one rank sends to others per micro-step (REFERENCE sec. 4): per transfer,
    # the rows held for the other ep - 1 ranks' experts (whole rows; int64 division).
    ep = lift(b.ep)
    on = layers.moe & (ep > 1)
    transfers = lift(a2a_transfers(b))
    row_bytes = dl * lift(c(compute_bytes(b)))
    a2a = total(np.where(on, transfers * c(rows_int * (ep - 1) // ep) * row_bytes, 0))
    shuffled = on & layers.shuffle
    tokens = lift(b.micro_batch * b.seq_len)
    shuffle = total(np.where(shuffled, transfers * c(tokens - tokens // ep) * row_bytes, 0))
    calls = transfers * np.where(shuffled, 2, 1) + np.where(dropless, lift(np.where(b.recompute == FULL, 2, 1)), 0)  # + split exchanges
    a2a_calls = total(np.where(on, calls, 0))

    # ZeRO's collectives per optimizer step: stage 1 all-gathers the updated chunks once per
    # unit (dense over dp, experts over dp/ep); FSDP2 (2, 3) gathers every unit's parameters
    # each micro-step (twice at stage 3: forward and backward) and reduce-scatters its
    # gradients. Units: each block, the root (embeddings, final norm, head), each expert bank
    # when dp/ep > 1.
    micro = c(b.global_batch // (b.micro_batch * b.dp))
    dp_on, edp_on = b.dp > 1, (b.dp // b.ep > 1) & (b.n_moe_layers > 0)
    units = n_layers + where_any(b.headless, 0, 1) + np.where(edp_on, c(b.n_moe_layers), 0)  # the root is the decoder part's
    fsdp = (b.zero_stage >= 2) & dp_on
    zero_gathers = np.where((b.zero_stage == 1) & dp_on, units, np.where(fsdp, units * micro * np.where(b.zero_stage == 3, 2, 1), 0))
    zero_reduce_scatters = np.where(fsdp, units * micro, 0)

    # Model FLOPs per token, for MFU: 6 per active matmul parameter (the embedding lookup is no
    # matmul; a tied table still does the LM head's) plus attention, 6 * L * H * (hd + v) * S
    # (the useful widths: MLA's value padding is not model work).
    active_matmul = params_active - embedding + np.where(b.tied & ~b.headless, v * d, 0)  # a tied table is the head's matmul
    per_token = 6 * active_matmul + where_any(b.lstm, 0, 6 * n_layers * heads * (hd + c(b.v_head_dim)) * s)
    model_flops_per_seq = per_token * s
    if crossing.any():  # per sequence, cross-attention's k and v weights work on the encoder's rows, its scores over its length
        cross_kv = n_layers * np.where(crossing, 2 * d * q_width, 0)
        model_flops_per_seq = (per_token - 6 * cross_kv + 6 * n_layers * heads * 2 * hd * s_enc) * s + 6 * cross_kv * s_enc
    result = {
        "params_total": params_total, "params_active": params_active, "params_embedding": embedding,
        "expert_params": expert_params, "step_flops": step_flops, "a2a_bytes": a2a, "shuffle_a2a_bytes": shuffle,
        "a2a_calls": a2a_calls, "zero_all_gather_calls": c(zero_gathers), "zero_reduce_scatter_calls": c(zero_reduce_scatters),
        "model_flops_per_seq": model_flops_per_seq, "frozen_params": total(np.where(layers.selection_bias, e, 0)),
        "tp_saved_params": tp_saved_params, "tp_saved_flops": tp_saved_flops, "tp_all_reduce_calls": c(tp_all_reduces),
        "tp_all_reduce_bytes": c(tp_all_reduce_bytes), "tp_all_gather_calls": c(tp_all_gathers),
        "tp_all_gather_bytes": c(tp_all_gather_bytes), "tp_reduce_scatter_calls": c(tp_reduce_scatters),
        "tp_reduce_scatter_bytes": c(tp_reduce_scatter_bytes),
        **{f"flops_{name}": value for name, value in parts.items()},
    }  # fmt: skip
    if b.encoder is not None:  # the encoder stack's figures add up (its root: none; its final norm: counted)
        encoder = counts(b.encoder, dtype)
        result = {name: value + encoder[name] for name, value in result.items()}
    if b.encoder is None and not crossing.any():
        result["model_flops_per_token"] = per_token
    else:  # an encoder-decoder's tokens: inputs and targets
        tokens_per_seq = s + s_enc
        result["model_flops_per_token"] = _exact_div(result["model_flops_per_seq"] - result["model_flops_per_seq"] % tokens_per_seq, tokens_per_seq)
    return result


def sharded_elements(b: DesignBatch) -> np.ndarray:
    """Elements of the largest share of a rank's parameters when ZeRO shards them: dense
    parameters by rows over dp, ceil(dim0 / W) rows each (FSDP2's Shard(0)); expert banks
    ([E/ep, D, F]) over dp/ep, by expert, or by their second dim when a rank holds fewer
    experts than there are replicas. Tensor and pipeline parallel are not applied here.
    float64, exact: a share is never larger than the model (below 2**53)."""
    n, layers = len(b), b.table
    lift = layers.lift
    ranks, expert_ranks = b.dp.astype(np.float64), (b.dp // b.ep).astype(np.float64)
    d, v, s = b.d_model, b.vocab, b.seq_len
    inputs = np.where(b.gated, 2, 1)  # input projections of an FFN: w_gate and w_up, or w_up alone
    q_width, kv_width = b.n_heads * b.head_dim, b.n_kv_heads * b.head_dim
    per_norm = where_any(b.lstm, 0, np.where(b.norm_bias, 2, 1))
    norm = _chunk(d, 1, ranks) * per_norm
    bias = np.where(b.qkv_bias, _chunk(q_width, 1, ranks) + 2 * _chunk(kv_width, 1, ranks), 0) + np.where(b.out_bias, _chunk(d, 1, ranks), 0)
    qk_norm = per_norm * np.where(b.qk_norm == QK_FULL, _chunk(q_width, 1, ranks) + _chunk(kv_width, 1, ranks),
                                  np.where(b.qk_norm == QK_PER_HEAD, 2 * _chunk(b.head_dim, 1, ranks), 0))  # fmt: skip
    weights = sum(np.where(present, _chunk(o, i, ranks), 0) for i, o, present in attention_linears(b))  # [out, in] Linears
    weights = where_any(b.lstm, lambda: 2 * (_chunk(4 * d, d, ranks) + _chunk(4 * d, 1, ranks)), weights)  # LSTM: ih, hh and biases
    latent_norms = per_norm * np.where(b.mla, _chunk(b.kv_lora_rank, 1, ranks) + np.where(b.q_lora_rank > 0, _chunk(b.q_lora_rank, 1, ranks), 0), 0)
    block = 2 * norm + weights + bias + qk_norm + latent_norms + np.where(b.sinks, _chunk(b.n_heads, 1, ranks), 0)
    block = block + where_any(b.cross_len > 0, lambda: norm + 3 * _chunk(q_width, d, ranks) + _chunk(d, q_width, ranks), 0)  # cross: q, k, v [Hhd, D], o [D, Hhd]
    dense_ffn = inputs * _chunk(b.d_ff, d, ranks) + _chunk(d, b.d_ff, ranks)
    outer = where_any(b.headless, 0, _chunk(v, d, ranks)) + np.where(b.learned_positions, _chunk(s, d, ranks), 0) \
        + np.where(b.tied | b.headless, 0, _chunk(v, d, ranks)) + np.where(b.lm_head_bias, _chunk(v, 1, ranks), 0) \
        + where_any(b.rel_buckets > 0, lambda: _chunk(b.rel_buckets, b.n_heads, ranks), 0)  # fmt: skip
    outer = outer + norm + b.n_layers * block + b.dense_blocks * dense_ffn
    r, er, dl, gated = lift(ranks), lift(expert_ranks), lift(d), lift(inputs)
    width, e, sw = layers.d_ff, layers.experts, layers.shared_count * layers.shared_d_ff
    group_ffn = np.where(width > 0, gated * _chunk(width, dl, r) + _chunk(dl, width, r), 0)  # dense groups of an explicit table
    router = layers.router_matrices * _chunk(e, dl, r) + np.where(layers.router_bias, _chunk(e, 1, r), 0) \
        + np.where(layers.selection_bias, _chunk(e, 1, r), 0)  # fmt: skip
    shared = np.where(sw > 0, gated * _chunk(sw, dl, r) + _chunk(dl, sw, r), 0)
    shared = shared + np.where((sw > 0) & layers.shared_gate, _chunk(1, dl, r), 0)
    # Expert banks shard by expert (dim 0) unless there are fewer local experts than ranks,
    # then by their second dim, D of w_gate/w_up [e, D, F] and F of w_down [e, F, D] (torchtitan's rule).
    local, f = e // lift(b.ep), layers.expert_d_ff
    by_row = (gated + 1) * _chunk(local, dl * f, er)
    by_col = local * (gated * _chunk(dl, f, er) + _chunk(f, dl, er))
    # gpt-oss's expert biases, [e, F] per input projection and [e, D]: by expert, or by their second dim
    by_row = by_row + np.where(layers.expert_bias, gated * _chunk(local, f, er) + _chunk(local, dl, er), 0)
    by_col = by_col + np.where(layers.expert_bias, local * (gated * _chunk(f, 1, er) + _chunk(dl, 1, er)), 0)
    bank = np.where(layers.moe, np.where(er > local, by_col, by_row), 0)
    encoder = 0 if b.encoder is None else sharded_elements(b.encoder)
    return outer + layers.per_design((group_ffn + router + shared + bank) * layers.count, n) + encoder


def state_bytes(b: DesignBatch, counts: dict) -> dict[str, np.ndarray]:
    """Bytes of parameters, gradients and AdamW state on the rank that holds the most,
    at rest after an optimizer step (float64; exact below 2**53 bytes)."""
    shard = b.tp * b.pp
    # tp: the largest rank's share of the split weights (counts' tp_saved_params); pp: the
    # average stage (stages differ: the first holds the embeddings, the last the head)
    dense = (counts["params_total"] - counts["expert_params"] - counts.get("tp_saved_params", 0)) / b.pp
    expert = counts["expert_params"] / b.ep / b.pp  # E is a multiple of ep: exact
    full, sharded = dense + expert, sharded_elements(b) / shard
    # Frozen parameters (ERNIE's score correction) get no gradient and no AdamW state.
    frozen_full = counts.get("frozen_params", 0) / b.pp  # a router correction: whole on every tp rank
    frozen_sharded = frozen_sharded_elements(b) / shard if np.any(frozen_full) else 0.0
    return {
        "params": 4 * np.where(b.zero_stage >= 2, sharded, full),
        "grads": 4 * np.where(b.zero_stage >= 2, sharded - frozen_sharded, full - frozen_full),
        "optimizer": 8 * np.where(b.zero_stage >= 1, sharded - frozen_sharded, full - frozen_full),
        "full_dense": dense, "full_expert": expert, "dense_grads": 4 * (dense - frozen_full),
    }


def frozen_sharded_elements(b: DesignBatch) -> np.ndarray:
    """The frozen parameters' share of `sharded_elements` (ERNIE's [E] correction per MoE
    layer, sharded by rows over dp like any dense parameter)."""
    layers = b.table
    chunk = np.where(layers.selection_bias, _chunk(layers.experts, 1, layers.lift(b.dp.astype(np.float64))), 0.0)
    return layers.per_design(layers.count * chunk, len(b)) + (0 if b.encoder is None else frozen_sharded_elements(b.encoder))


def exact_counts(b: DesignBatch) -> dict[str, np.ndarray]:
    """`counts` as int64 (exact), or float64 for a figure some design takes past 2**62.
    Computed in float64 first: every intermediate is an integer no larger than its figure,
    so below 2**53 the float is exact and converts losslessly; only a batch with a figure
    between 2**53 and 2**62 pays for the int64 pass."""
    approx = counts(b, np.float64)
    exact = None
    out = {}
    for name, value in approx.items():
        top = value.max() if len(value) else 0.0  # counts are never negative
        if top < 2.0**53:
            out[name] = value.astype(np.int64)
        elif top < EXACT_LIMIT:
            exact = exact if exact is not None else counts(b, np.int64)
            out[name] = exact[name]
        else:
            out[name] = value
    return out


# --- one plan (a batch of one) ------------------------------------------------------------------


def plan_counts(plan: SpecPlan) -> dict:
    """`exact_counts` of one plan as Python numbers."""
    return {name: value[0].item() for name, value in exact_counts(DesignBatch.from_plans([plan])).items()}


@dataclass(frozen=True)
class ParamPrediction:
    total: int
    active: int  # per token: dense + router + k routed experts + shared, embeddings included
    embedding: int  # token embeddings (+ learned positions)


def predict_params(plan: SpecPlan) -> ParamPrediction:
    figures = plan_counts(plan)
    return ParamPrediction(figures["params_total"], figures["params_active"], figures["params_embedding"])


def predict_step_flops(plan: SpecPlan) -> int:
    """FlopCounterMode's count for one training micro-step (forward + backward) on one rank."""
    return plan_counts(plan)["step_flops"]


def step_flops_by_part(plan: SpecPlan) -> dict[str, int]:
    """`predict_step_flops` split by part (attention, dense FFN, router, experts, shared
    experts, LM head, recomputation); the parts sum to the total exactly."""
    return flops_by_part(plan_counts(plan))


def flops_by_part(figures: dict) -> dict:
    """The non-zero `flops_<part>` figures of one design, by part name."""
    return {name[len("flops_"):]: value for name, value in figures.items() if name.startswith("flops_") and value}


def predict_a2a_bytes(plan: SpecPlan) -> int:
    """Bytes one rank sends to others by expert dispatch and combine in one micro-step."""
    return plan_counts(plan)["a2a_bytes"]
