"""Memory per device of one training step, for a batch of designs: the half of the one cost
model (cost.py `evaluate`) that says what a rank holds and when it peaks (REFERENCE sec. 5).
The state a rank holds is exact (counts.state_bytes); activations are counted from the
model's code (activations.py); the peak is the largest of the moments `memory` lists, each
read off the runtime (the gradient sync's buckets and ZeRO-1's gather units are
distributed/data_parallel.py's). Shape legend as in counts.py.
"""

from __future__ import annotations

import numpy as np

from moespec.sim.activations import activation_memory
from moespec.sim.backend import Backend
from moespec.sim.counts import attention_matmul_elements, compute_bytes, expert_rows
from moespec.sim.design import DesignBatch, parts

ALLOCATOR_ALLOWANCE = 0.10  # fragmentation and workspace: 10% on top of the tensors' peak, for `fits`


@np.errstate(divide="ignore", invalid="ignore")  # ep not dividing dp: such designs are not valid
def memory(b: DesignBatch, backend: Backend, counts: dict, state: dict) -> dict[str, np.ndarray]:
    """Peak bytes on one device: the state it holds (counts.state_bytes, exact), the
    parameters FSDP2 gathers for compute (ZeRO-2: all of them through the step; ZeRO-3: the
    largest block at a time), and the peak of a step: the start of backward, the top and the
    lowest dropless layer's backward (sim/activations.py), the gradient sync (every gradient,
    and the flat copy of one bucket of small expert gradients: `expert_grad_buckets`),
    AdamW's step (`_optimizer_temporaries`), ZeRO-1's gather of the updated parameters (one
    unit: `_zero1_gather_buffers`); `fits` adds a 10% allowance for the allocator's slack."""
    full = state["full_dense"] + state["full_expert"]  # elements this rank computes with
    gathered = np.where(b.zero_stage == 2, 4 * full - state["params"], 0.0)
    biggest = np.maximum.reduce([_block_elements(part, part.table) for part in parts(b)])
    gathered = np.where(b.zero_stage == 3, 4 * biggest / (b.tp * b.pp), gathered)
    bpe = compute_bytes(b)
    a2a, top_dropless_grads, expert_grads = np.zeros(len(b)), np.zeros(len(b)), np.zeros(len(b))
    for part in parts(b):
        layers = part.table
        has_a2a = layers.moe & (layers.count > 0) & layers.lift(b.ep > 1)
        a2a = np.maximum(a2a, 2.0 * layers.max_per_design(np.where(has_a2a, expert_rows(part, layers), 0), len(b)) * b.d_model * bpe)
        matrices = layers.lift(np.where(b.gated, 3, 2))
        layer_grads = np.where(layers.moe & layers.dropless & (layers.count > 0), (layers.experts // layers.lift(b.ep)) * matrices * layers.lift(b.d_model)
                               * layers.expert_d_ff * 4.0, 0.0)  # fmt: skip
        top_dropless_grads = np.maximum(top_dropless_grads, layers.max_per_design(layer_grads, len(b)) / (b.tp * b.pp))
        expert_grads = expert_grads + layers.per_design(layers.count * layer_grads, len(b)) / (b.tp * b.pp)
    held = state["params"] + gathered + state["optimizer"]
    kept = activation_memory(b, state["params"])
    activations = kept["activations"]
    micro_steps = b.global_batch // (b.micro_batch * b.dp)
    # Gradients already held when backward starts: those accumulated over the step's earlier
    # micro-steps; on the first, DDP's buckets of the dense ones (held for the whole run:
    # gradient_as_bucket_view). A dropless layer's backward then adds its expert gradients.
    earlier_grads = np.where(micro_steps > 1, state["grads"], np.where(ddp_wraps(b), state["dense_grads"], 0.0))
    start_of_backward = held + earlier_grads + activations + kept["loss_temporaries"]
    top_dropless_backward = held + earlier_grads + np.where(micro_steps > 1, 0.0, top_dropless_grads) + activations \
        - kept["freed_above_top_moe"] + kept["moe_temporaries"]  # fmt: skip
    # The lowest dropless layer's backward, where every MoE layer is dropless: all their expert
    # gradients made, all the blocks above it freed.
    bottom_dropless_backward = np.where(kept["bottom_moe_point"], held + earlier_grads + np.where(micro_steps > 1, 0.0, expert_grads)
                                        + activations - kept["freed_above_bottom_moe"] + kept["moe_temporaries"], 0.0)  # fmt: skip
    # After backward, expert gradients replicated over the edp group (dp / ep > 1, ZeRO 0/1)
    # are all-reduced in buckets, the ones that hold several tensors through a flat copy
    # (distributed/data_parallel.py all_reduce_buckets).
    flat = np.where((b.dp // b.ep > 1) & (b.zero_stage < 2), state["expert_buckets"][1], 0.0)
    grad_sync = held + state["grads"] + flat
    optimizer_step = held + state["grads"] + _optimizer_temporaries(b, backend, state)
    # ZeRO-1 gathers the updated parameters after the step, one unit at a time, with every
    # gradient still held: a send buffer (this rank's chunks) and the received [world * chunks]
    # of the largest unit (distributed/zero.py all_gather).
    zero1_gather = np.where(b.zero_stage == 1, held + state["grads"] + _zero1_gather_buffers(b, state["largest_tensors"]), 0.0)
    total = np.maximum.reduce([start_of_backward, top_dropless_backward, bottom_dropless_backward, grad_sync, optimizer_step, zero1_gather])
    allowance = ALLOCATOR_ALLOWANCE * total  # the allocator's slack: counts for `fits`, not in the peak
    return {
        "memory_weights_bytes": state["params"], "memory_gathered_weights_bytes": gathered,
        "memory_grads_bytes": state["grads"], "memory_optimizer_bytes": state["optimizer"],
        "memory_activations_bytes": activations, "memory_a2a_buffers_bytes": a2a, "memory_allowance_bytes": allowance,
        "memory_total_bytes": total, "fits": total + allowance <= backend.device.memory_bytes,
    }  # fmt: skip


def ddp_wraps(b: DesignBatch) -> np.ndarray:
    """Whether DDP wraps the model (train.py: dp > 1, ZeRO 0/1, neither tp nor pp): its dense
    all-reduce overlaps backward, and its buckets hold the dense gradients for the whole run."""
    return (b.dp > 1) & (b.zero_stage < 2) & (b.tp == 1) & (b.pp == 1)


def _optimizer_temporaries(b: DesignBatch, backend: Backend, state: dict) -> np.ndarray:
    """Bytes AdamW allocates inside its step, on top of every gradient and its state.

    CPU ranks (gloo backends) run torch's single-tensor AdamW (foreach kernels are CUDA's):
    per parameter, sqrt(v) and its quotient by the bias correction, while the previous
    parameter's denominator is still referenced. With a run of equal tensors (an expert bank's
    three weights, a FFN's) that is 3 of them; the embedding and the LM head stand alone: 2.
    Measured with MemTracker: a tiny BASE model's step peaked 3.0 x its expert weight above
    the state (tests/test_profile_memory.py). GPU ranks (NCCL) run the foreach AdamW, whose
    `_foreach_sqrt` makes sqrt(v) of every tensor the optimizer updates at once: the bytes of
    the parameters it steps (half its state). That is torch's `_multi_tensor_adam` as read,
    not yet measured here. A ZeRO stage divides the tensors AdamW sees by the ranks sharing
    them (dense over dp, experts over edp)."""
    if backend.collective_library != "gloo":
        return state["optimizer"] / 2
    sharded = b.zero_stage >= 1
    dense_share = np.where(sharded, b.dp, 1).astype(np.float64)
    expert_share = np.where(sharded, np.maximum(b.dp // b.ep, 1), 1).astype(np.float64)
    bank, split, table = state["largest_tensors"]  # split: a FFN's or attention's largest matrix
    largest_run = np.maximum(bank / expert_share, split / dense_share)
    return 4.0 * np.maximum(3 * largest_run, 2 * table / dense_share)


GRAD_BUCKET_BYTES = 25 * 2**20  # the runtime's gradient buckets (distributed/data_parallel.py): DDP's default
GRAD_ALONE_BYTES = 2**20  # the runtime reduces a gradient this large in place, in a call of its own


def expert_grad_buckets(bank_elements: np.ndarray, bank_tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(buckets, bytes of the largest flat copy) of the expert gradients' all-reduce: the
    runtime reduces a tensor of GRAD_ALONE_BYTES or more in place, in a call of its own, and
    packs smaller ones, consecutive, up to GRAD_BUCKET_BYTES, copying a bucket only when it
    holds several. Taken as equal tensors of the largest bank's size (a bank's three are equal;
    gpt-oss's expert biases are small beside them)."""
    bank = 4.0 * bank_elements
    tensors = np.asarray(bank_tensors).astype(np.float64)
    per_bucket = np.where((bank > 0) & (bank < GRAD_ALONE_BYTES), np.maximum(np.floor(GRAD_BUCKET_BYTES / np.maximum(bank, 1.0)), 1.0), 1.0)
    held = np.minimum(per_bucket, tensors)
    return np.ceil(tensors / per_bucket), np.where(held >= 2, held * bank, 0.0)


def largest_tensors(b: DesignBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elements of a rank's largest expert bank tensor, largest FFN or attention matrix, and
    embedding table (0 for an encoder's part), whole before any ZeRO sharding."""
    layers = b.table
    d, tp = b.d_model.astype(np.float64), b.tp.astype(np.float64)
    bank = layers.max_per_design(np.where(layers.moe & (layers.count > 0), layers.experts // layers.lift(b.ep) * layers.lift(d) * layers.expert_d_ff, 0.0), len(b))
    widths = layers.max_per_design(np.where(layers.count > 0, layers.shared_count * layers.shared_d_ff + layers.d_ff, 0.0), len(b))
    widths = np.maximum(widths, np.where(b.dense_blocks > 0, b.d_ff, 0))
    split = d * np.maximum(widths, b.n_heads * b.head_dim) / tp
    return bank, split, np.where(b.headless, 0.0, b.vocab * d)


def _zero1_gather_buffers(b: DesignBatch, largest: tuple) -> np.ndarray:
    """Bytes of ZeRO-1's gather buffers: (W + 1) chunks of the largest unit over a group of W
    ranks (dense over dp: the root's tables or a block's attention and FFN matrices; experts
    over dp/ep: one layer's bank). largest: `largest_tensors(b)`."""
    bank, split, table = largest
    matrices = np.where(b.gated, 3.0, 2.0)
    block = attention_matmul_elements(b, np.float64) / b.tp + matrices * split
    root = table * (2.0 - b.tied)
    edp = b.dp // b.ep
    dense = np.where(b.dp > 1, np.maximum(block, root) / b.dp * (b.dp + 1), 0.0)
    return 4.0 * np.maximum(dense, np.where(edp > 1, matrices * bank / np.maximum(edp, 1) * (edp + 1), 0.0))


def _block_elements(b: DesignBatch, layers) -> np.ndarray:
    """Parameters of each design's largest block as one rank computes with it (its experts)."""
    d = b.d_model.astype(np.float64)
    attention = d * (2 * b.n_heads * b.head_dim + 2 * b.n_kv_heads * b.head_dim)
    matrices = np.where(b.gated, 3, 2)
    widths = layers.experts // layers.lift(b.ep) * layers.expert_d_ff + layers.shared_count * layers.shared_d_ff + layers.d_ff
    groups = layers.max_per_design(np.where(layers.count > 0, layers.lift(matrices * d) * widths, 0.0), len(b))
    return attention + np.maximum(groups, np.where(b.dense_blocks > 0, matrices * d * b.d_ff, 0.0))
