"""A training step's op list, per design, for the operator database (sim/opdb.py).

What one rank runs per micro-step, forward and backward (as arrays over designs):
- Linears (M rows, K in, N out, dtype): attention q, k, v, o; dense FFNs; routers (fp32:
  selective precision); shared experts; the LM head. Routed experts: a capacity bank's bmm
  per projection (`bmm`), or the dropless kernel per local expert (`grouped`); BASE's equal
  groups by `bmm` too (`batched_kernel`).
- Causal SDPA over micro_batch x n_heads heads of S x hd, per block.
- Other ops (norms, RoPE, activations, routing, dispatch, losses, casts, views): counted, not
  sized: each costs `op_s` of host time, their bytes go through `elementwise_bytes`. The
  counts are those of `profiling/optrace.py` on the real model (tests/test_op_counts.py
  checks them within 5% on a matrix of specs). BASE's auction is timed whole instead
  (`auction_s`): its rounds depend on the scores.
- Dispatch and combine rows (index_select / index_add, gathers): bytes at `gather_Bps`
  (capacity layers; the dropless kernel's own gathers are in its `grouped` time).
- Optimizer: clipping and AdamW, 10 ops per parameter tensor plus 8, and their arithmetic
  by tensor size (expert banks apart from the rest).
Recomputation replays the forward: a third of each replayed op's forward + backward time.
"""

from __future__ import annotations

import numpy as np

from moespec.sim.counts import FULL, QK_L2, SELECTIVE, attention_linears, base_padded, compute_bytes, expert_rows
from moespec.sim.design import PRECISIONS, ROUTER_NAMES, DesignBatch, weighted_qk_norm
from moespec.sim.opdb import OpDatabase
from moespec.sim.tensors import trained_tensors

FP32 = PRECISIONS.index("fp32")

# Other (non-matmul, non-attention) ATen ops per micro-step, forward + backward, measured
# with profiling/optrace.py on the built model (fp32, swiglu, RMSNorm, RoPE, no biases).
STEP_OPS = 63  # embedding, final norm, LM head's surroundings, loss
DENSE_BLOCK_OPS = 178  # two norms, attention around SDPA, gated FFN, residuals
UNGATED_FFN_OPS = -14  # relu / gelu FFN instead of a gated one
NORM_OPS_LAYERNORM = -21  # per norm: LayerNorm is one fused op, RMSNorm several
ROPE_OPS = 28  # per block; learned positions instead cost one add at the embedding
QKV_BIAS_OPS = 9  # per block
BIAS_OPS = 3  # per other biased Linear (o_proj, the LM head): its gradient's sum and the add
QK_NORM_OPS = 50  # per block, q and k RMSNorms (LayerNorm: QK_NORM_OPS_LAYERNORM); autocast adds QK_NORM_AUTOCAST_OPS
QK_NORM_OPS_LAYERNORM = 2
QK_NORM_AUTOCAST_OPS = 8
NORM_BIAS_OPS = 1  # per LayerNorm with its bias
CLAMPED_FFN_OPS = 19  # per autograd FFN (dense, shared, a capacity bank) with the clamped SwiGLU: clamps, sigmoid, the +1
CLAMPED_KERNEL_OPS = 25  # the same inside the dropless kernel (its hand-written derivative)
EXPERT_BIAS_OPS = {"dropless": 27, "capacity": 15}  # per MoE layer with expert biases: gathers and index_adds, or broadcasts
SINK_OPS = 35  # per block, attention sinks: the extra channel and key, their mask, the slice back (+2 under autocast)
WINDOW_OPS = 12  # per layer with a sliding window shorter than the sequence: its mask (5 when sinks already build one)
L2_QK_OPS = 38  # per layer with RoPE, Llama-4's weightless QK-norm
GATE_INPUT_OPS = 6  # per MoE layer whose gate scales the expert input
PARTIAL_ROPE_OPS = 17  # per block, RoPE on part of each head: slices and a concatenation for q and k
MLA_OPS = 40  # per block, latent attention over standard attention (its norm, splits, the shared rotary key)
MLA_Q_LORA_OPS = 35  # per block, the query bottleneck (q_a, its norm, q_b)
MLA_PAD_OPS = 3  # per block, values padded to the query width and the output sliced back
MLA_Q_LORA_AUTOCAST_OPS = 21  # per block under autocast, the bottleneck's casts (without it MLA casts as many as q, k, v, o)
AUTOCAST_OPS = 37  # per block under bf16/fp16 autocast: the casts
DROPOUT_OPS = 57  # per block: three dropouts and attention's unfused path
MOE_BLOCK_OPS = 287  # a capacity top-k MoE block (router, dispatch, bank, combine, losses)
ROUTER_OPS = {"topk": 0, "switch": -10, "sinkhorn": 12, "expert_choice": -33, "hash": -41, "sigmoid_bias": -15,
              "noisy_topk": 100, "base": 0, "sparsemixer": -12}  # fmt: skip
SPARSEMIXER_CHOICE_OPS = 32  # per expert a SparseMixer token chooses (its mask, softmax, sample, Heun's estimate)
DROPLESS_OPS = -12  # dropless (one gather, one scatter per pass, grouped GEMMs) instead of capacity
BASE_PAD_OPS = 12  # BASE's groups padded back to equal (moe_layer.pad_groups: 11 forward, 1 backward; traced)
GROUPED_GEMM_CALLS = 9  # a gated dropless layer's grouped GEMMs, forward + backward (plain: 6; timed by `grouped`)
# Where the grouped GEMM cannot run (a width whose bytes are not a multiple of 16), the
# kernel loops over the non-empty local experts instead (timed by `grouped` too):
GROUP_LOOP_OPS = 39  # per group, gated: its 9 mm and the slices they write into (plain: 26 with 6 mm)
LOOP_LAYER_OPS = 4  # per layer, the loop's extra ops
SHARED_OPS = 26
# T5 encoder-decoders (model/encoder_decoder.py), traced like the rest:
ENCODER_STACK_OPS = 78  # per model, booked to its encoder part: its embedding lookup and final norm, both stacks' buckets and bias lookups, the causal mask
RELATIVE_BLOCK_OPS = 13  # per block: T5 attention (no RoPE, the bias cast, SDPA's math path) over a RoPE block
CROSS_ATTENTION_OPS = 87
# Shazeer et al. 2017's LSTM host (model/lstm_host.py), traced the same way:
LSTM_HOST_OPS = 30  # per model: embedding, head, loss
LSTM_LAYER_OPS = 5  # per layer: the input projection, the stack of the outputs
LSTM_STEP_OPS = 48  # per layer and time step: the recurrent product, gates, cell and output
LSTM_MOE_OPS = 38  # per MoE layer, over MOE_BLOCK_OPS - DENSE_BLOCK_OPS: the residual, no dense FFN to replace
LSTM_AUTOCAST_OPS = {"model": 6, "layer": 8, "step": 4}  # under autocast: the casts
LSTM_DROPOUT_OPS = {"model": 5, "layer": 5}  # with dropout  # per decoder block: its norm, q, k, v, o, fused SDPA, residual
UNGATED_EXPERT_OPS = -7
GATHER_PASSES = 8  # dispatch + combine, forward and backward: each [rows, D] read or written 8 times
KERNEL_GATHER_PASSES = 10  # the dropless kernel's: gather, scatter; backward two gathers and a scatter
OPTIMIZER_OPS_PER_TENSOR = 10  # clip's norm and scale, AdamW's lerp, mul, addcmul, sqrt, div, addcdiv...
OPTIMIZER_OPS = 8


def optimizer_s(b: DesignBatch, db: OpDatabase, params_held: np.ndarray) -> np.ndarray:
    """Clipping + AdamW of one optimizer step: its ops' dispatch, and its arithmetic by tensor
    size: the expert banks (matrices per MoE block, each E_local x D x F: the largest tensors)
    apart from the mean of the others. `params_held`: parameters on this rank."""
    tensors = trained_tensors(b)
    bank_count, bank_params = 0, 0.0
    for part in [b] if b.encoder is None else [b, b.encoder]:
        layers = part.table
        matrices = layers.lift(np.where(b.gated, 3, 2))
        local = layers.experts // layers.lift(b.ep)
        bank_size = np.where(layers.moe, local * layers.lift(b.d_model) * layers.expert_d_ff, 0).astype(np.float64)
        bank_count = bank_count + layers.per_design(layers.count * np.where(layers.moe, matrices, 0), len(b))
        bank_params = bank_params + layers.per_design(layers.count * np.where(layers.moe, matrices * bank_size, 0.0), len(b))
    bank_size = np.where(bank_count > 0, bank_params / np.maximum(bank_count, 1), 0.0)
    shard = np.maximum(b.tp * b.pp, 1)
    rest_params = np.maximum(params_held - bank_params / shard, 0.0)
    rest_count = np.maximum(tensors - bank_count, 1)
    arithmetic = db.optimizer_params_s(bank_count, bank_size / shard) + db.optimizer_params_s(rest_count, rest_params / rest_count)
    return (OPTIMIZER_OPS + OPTIMIZER_OPS_PER_TENSOR * tensors) * db.optimizer_op_s + arithmetic


def other_ops(b: DesignBatch) -> tuple[np.ndarray, np.ndarray]:
    """(ops at `op_s`, dropless kernel ops) per micro-step on one rank; the kernel's
    are timed whole by the grouped database, counted here to check the list against a trace."""
    layers = b.table
    lift = layers.lift
    autocast = b.precision != FP32
    block = (DENSE_BLOCK_OPS + np.where(b.layernorm, 2 * NORM_OPS_LAYERNORM, 0) + np.where(b.learned_positions, 0, ROPE_OPS) - ROPE_OPS
             + np.where(b.qkv_bias, QKV_BIAS_OPS, 0) + np.where(autocast, AUTOCAST_OPS, 0) + np.where(b.dropout > 0, DROPOUT_OPS, 0)
             + np.where(b.out_bias, BIAS_OPS, 0) + np.where(b.sinks, SINK_OPS + 2 * autocast, 0) + np.where(~b.mla & (b.rope_dim > 0) & (b.rope_dim < b.head_dim), PARTIAL_ROPE_OPS, 0) + np.where(b.layernorm & ~b.norm_bias, -2 * NORM_BIAS_OPS, 0)
             + np.where(weighted_qk_norm(b), np.where(b.layernorm, QK_NORM_OPS_LAYERNORM, QK_NORM_OPS + np.where(autocast, QK_NORM_AUTOCAST_OPS, 0)), 0)
             + np.where(b.mla, MLA_OPS + np.where(b.q_lora_rank > 0, MLA_Q_LORA_OPS + np.where(autocast, MLA_Q_LORA_AUTOCAST_OPS, 0), 0)
                        + np.where(b.v_head_dim != b.head_dim, MLA_PAD_OPS, 0), 0))  # fmt: skip
    dense_extra = np.where(b.gated, np.where(b.clamped, CLAMPED_FFN_OPS, 0), UNGATED_FFN_OPS)
    router = np.array([ROUTER_OPS[name] for name in ROUTER_NAMES])[layers.router]
    router = router + np.where(np.asarray(ROUTER_NAMES)[layers.router] == "sparsemixer", SPARSEMIXER_CHOICE_OPS * layers.k, 0)
    moe = (MOE_BLOCK_OPS - DENSE_BLOCK_OPS + router + np.where(lift(b.gated), 0, UNGATED_EXPERT_OPS)
           + np.where(layers.dropless, DROPLESS_OPS, 0) + np.where(layers.shared_count > 0, SHARED_OPS, 0))  # fmt: skip
    clamped = lift(b.clamped)
    moe = moe + np.where(layers.gate_input, GATE_INPUT_OPS, 0) + np.where(layers.expert_bias, np.where(layers.dropless, EXPERT_BIAS_OPS["dropless"], EXPERT_BIAS_OPS["capacity"]), 0) \
        + np.where(clamped, np.where(layers.dropless, CLAMPED_KERNEL_OPS, CLAMPED_FFN_OPS) + np.where(layers.shared_count > 0, CLAMPED_FFN_OPS, 0), 0)  # fmt: skip
    moe = moe + np.where(base_padded(b, layers), BASE_PAD_OPS, 0)
    groups = np.where(layers.moe, moe, lift(dense_extra))
    rope_layers = np.where(b.learned_positions | (b.rope_dim == 0), 0, b.n_layers - b.nope_layers)
    host = np.where(b.qk_norm == QK_L2, L2_QK_OPS * rope_layers, 0) - np.where(b.learned_positions, 0, ROPE_OPS * b.nope_layers) \
        + b.window_layers * np.where(b.sinks, 5, WINDOW_OPS) + np.where(b.headless, ENCODER_STACK_OPS, STEP_OPS) + np.where(b.layernorm, NORM_OPS_LAYERNORM, 0) \
        + np.where(b.layernorm & ~b.norm_bias, -NORM_BIAS_OPS, 0) + np.where(b.lm_head_bias, BIAS_OPS, 0) \
        + b.n_layers * block + b.dense_blocks * dense_extra  # fmt: skip
    host = host + layers.per_design(layers.count * groups, len(b))
    # An LSTM host: its own ops per layer and per time step instead of a transformer's blocks
    # and final norm; a MoE layer's ops as in a transformer, less the dense FFN it replaces there.
    moe_ops = layers.per_design(layers.count * np.where(layers.moe, groups + LSTM_MOE_OPS, 0), len(b))
    cast, drop = LSTM_AUTOCAST_OPS, LSTM_DROPOUT_OPS
    per_layer = LSTM_LAYER_OPS + LSTM_STEP_OPS * b.seq_len + np.where(autocast, cast["layer"] + cast["step"] * b.seq_len, 0) \
        + np.where(b.dropout > 0, drop["layer"], 0)  # fmt: skip
    lstm = LSTM_HOST_OPS + np.where(autocast, cast["model"], 0) + np.where(b.dropout > 0, drop["model"], 0) + b.n_layers * per_layer + moe_ops
    host = np.where(b.lstm, lstm, host)
    host = host + np.where(b.rel_buckets > 0, b.n_layers * RELATIVE_BLOCK_OPS, 0) + np.where(b.cross_len > 0, b.n_layers * (CROSS_ATTENTION_OPS + np.where(b.layernorm, NORM_OPS_LAYERNORM - np.where(b.norm_bias, 0, NORM_BIAS_OPS), 0)), 0)
    loop = layers.moe & layers.dropless & ~grouped_gemm(b, layers)
    host = host + layers.per_design(layers.count * np.where(loop, LOOP_LAYER_OPS, 0), len(b))
    kernel, matmuls = dropless_kernel_ops(b, layers)
    group = layers.per_design(layers.count * kernel, len(b))
    return host.astype(np.float64), group.astype(np.float64)


def local_expert_rows(b: DesignBatch, layers) -> np.ndarray:
    """Rows each rank's local expert computes on per micro-step, per group (every ep rank's
    share of its tokens)."""
    return expert_rows(b, layers) * layers.lift(b.ep) / np.maximum(layers.experts, 1)


def batched_kernel(b: DesignBatch, layers, db: OpDatabase) -> np.ndarray:
    """Per group: BASE with T % E == 0 gives every expert exactly T/E rows, and on one rank
    groups left uneven by its padding are padded back (`base_padded`); the dropless kernel
    runs them as one bmm per projection (model/group_matmuls.py `uniform_rows`): timed by the
    bmm database, its gathers and scatters at the gather bandwidth (`gather_bytes`). Not where
    the calibrated machine runs such fp32 products on the thread engine instead (`db`'s
    `equal_groups_threaded_flops`, from 2 * rows * D * F): those time as other dropless groups."""
    even = layers.lift(b.micro_batch * b.seq_len) % np.maximum(layers.experts, 1) == 0
    equal = layers.moe & layers.dropless & layers.balanced & (even | base_padded(b, layers))
    if not np.isfinite(db.equal_groups_threaded_flops):
        return equal
    flops = 2.0 * local_expert_rows(b, layers) * layers.lift(b.d_model) * layers.expert_d_ff
    return equal & ~((layers.lift(b.precision) == FP32) & (flops >= db.equal_groups_threaded_flops))


def grouped_gemm(b: DesignBatch, layers) -> np.ndarray:
    """Per group: the dropless kernel runs torch._grouped_mm (model/group_matmuls.py
    `grouped_gemm_available`): both widths' bytes a multiple of 16 in the compute dtype."""
    element = np.where(layers.lift(b.precision) == FP32, 4, 2)
    return (layers.lift(b.d_model) * element % 16 == 0) & (layers.expert_d_ff * element % 16 == 0)


def dropless_kernel_ops(b: DesignBatch, layers) -> tuple[np.ndarray, np.ndarray]:
    """(ops, of which matmuls) of one dropless layer's expert kernel per micro-step, per
    group (0 for capacity groups): grouped GEMMs, or the loop's per-expert ops."""
    gated = layers.lift(b.gated)
    local = layers.experts // layers.lift(b.ep)
    calls = np.where(gated, GROUPED_GEMM_CALLS, GROUPED_GEMM_CALLS * 2 // 3)
    loop_ops = np.where(gated, GROUP_LOOP_OPS, 26) * local
    loop_mm = np.where(gated, 9, 6) * local
    dropless = layers.moe & layers.dropless
    grouped = grouped_gemm(b, layers)
    ops = np.where(dropless, np.where(grouped, calls, loop_ops), 0)
    return ops, np.where(dropless, np.where(grouped, calls, loop_mm), 0)


def linear_and_attention_s(b: DesignBatch, db: OpDatabase, *, imbalance: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(Linear seconds, SDPA seconds) of one micro-step on one rank, replays included."""
    layers = b.table
    lift, n = layers.lift, len(b)
    dtype = b.precision
    t = (b.micro_batch * b.seq_len).astype(np.float64)
    d, hd = b.d_model, b.head_dim
    matrices = np.where(b.gated, 3, 2) - 1  # input-side projections of an FFN

    def ffn(code, m, d_model, width, inputs):  # an FFN of `width` on m rows: `inputs` input-side Linears and the down one
        return inputs * db.linear_s(code, m, d_model, width) + db.linear_s(code, m, width, d_model)

    attention = sum(np.where(present, db.linear_s(dtype, t, np.maximum(i, 1), np.maximum(o, 1)), 0.0) for i, o, present in attention_linears(b))
    core = db.attention_s(dtype, b.micro_batch * b.n_heads, b.seq_len, np.maximum(hd, b.v_head_dim) + b.sinks)  # MLA: padded; sinks: a channel more
    dense = ffn(dtype, t, d, b.d_ff, matrices)
    tl, dl, code, inputs = lift(t), lift(d), lift(dtype), lift(matrices)
    router = db.linear_s(np.full(len(layers.count), FP32), tl, dl, layers.experts * layers.router_matrices)
    shared = np.where(layers.shared_count > 0, ffn(code, tl, dl, layers.shared_count * layers.shared_d_ff, inputs), 0.0)
    ep = lift(b.ep)
    local = layers.experts // ep
    rows = local_expert_rows(b, layers) * np.where(layers.dropless & ~layers.balanced, imbalance, 1.0)
    # Routed experts: a capacity bank's bmm per projection (bmm database); dropless groups by
    # the grouped database (the real kernel: its gathers, grouped GEMMs and scatter); BASE's
    # equal groups by the bmm database (the kernel's bmm), their gathers in `gather_bytes`,
    # unless the calibrated machine runs them on the thread engine (`batched_kernel`).
    bank = inputs * db.bmm_s(code, local, rows, dl, layers.expert_d_ff) + db.bmm_s(code, local, rows, layers.expert_d_ff, dl)
    grouped = db.grouped_s(code, local, rows, dl, layers.expert_d_ff) * np.where(inputs == 2, 1.0, 2 / 3)  # plain: 2 of 3 matrices
    experts = np.where(layers.dropless & ~batched_kernel(b, layers, db), grouped, bank)
    dense_groups = np.where(layers.d_ff > 0, ffn(code, tl, dl, layers.d_ff, inputs), 0.0)
    # Tensor parallel splits attention (heads) and the dense and shared FFNs (width) over tp;
    # the router, the routed experts and the head run whole on every tp rank.
    tp, tpl = b.tp.astype(np.float64), lift(b.tp).astype(np.float64)
    per_group = np.where(layers.moe, router + shared / tpl + experts, dense_groups / tpl)
    blocks = (b.n_layers * attention + b.dense_blocks * dense) / tp + layers.per_design(layers.count * per_group, n)
    # An LSTM layer: the input projection on every row, the recurrent one per step on B rows
    lstm = db.linear_s(dtype, t, d, 4 * d) + (b.seq_len - 1) * db.linear_s(dtype, np.maximum(b.micro_batch, 1).astype(np.float64), d, 4 * d)
    blocks = blocks + np.where(b.lstm, b.n_layers * (lstm - attention / tp) - b.dense_blocks * dense / tp, 0.0)  # no tp with an LSTM host
    core = np.where(b.lstm, 0.0, core)
    t_enc = (b.micro_batch * b.cross_len).astype(np.float64)
    q_width = b.n_heads * b.head_dim
    cross = 2 * db.linear_s(dtype, t, d, q_width) + 2 * db.linear_s(dtype, np.maximum(t_enc, 1), d, q_width) \
        + db.attention_s(dtype, b.micro_batch * b.n_heads, np.sqrt(b.seq_len * np.maximum(b.cross_len, 1)), hd)  # S x S_enc scores as a square of their geometric mean  # fmt: skip
    blocks = blocks + np.where(b.cross_len > 0, b.n_layers * cross, 0.0)
    head = np.where(b.headless, 0.0, db.linear_s(dtype, t, d, b.vocab))
    cores = b.n_layers * core
    replay = np.where(b.recompute == FULL, 1 / 3, 0.0)
    linear_s = (blocks * (1 + replay) + head) / b.pp
    attention_s = cores * (1 + np.where(b.recompute == SELECTIVE, 1 / 3, replay)) / (tp * b.pp)
    return linear_s, attention_s


def auction_s(b: DesignBatch, db: OpDatabase) -> np.ndarray:
    """BASE's balanced assignment per micro-step on one rank (forward only; a full replay
    reuses the assignment it recorded): the database's measured solver time of T x E."""
    layers = b.table
    base = np.asarray(ROUTER_NAMES)[layers.router] == "base"
    tokens = layers.lift(b.micro_batch * b.seq_len)
    per_group = np.where(layers.moe & base, db.auction_s(tokens, layers.experts), 0.0)
    return layers.per_design(layers.count * per_group, len(b)) / b.pp


def gather_bytes(b: DesignBatch, db: OpDatabase) -> np.ndarray:
    """Bytes dispatch and combine move per micro-step on one rank (rows in the compute dtype)."""
    layers = b.table
    rows = expert_rows(b, layers)
    passes = np.where(batched_kernel(b, layers, db), KERNEL_GATHER_PASSES, np.where(layers.moe & ~layers.dropless, GATHER_PASSES, 0))
    per_group = passes * rows * layers.lift(b.d_model * compute_bytes(b))
    return layers.per_design(layers.count * per_group, len(b)).astype(np.float64) / b.pp  # every tp rank dispatches all rows
