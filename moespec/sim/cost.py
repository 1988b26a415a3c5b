"""The one cost model: memory per device and time of one training step, for a batch of designs.

`evaluate(batch, backend)` is all of moespec's prediction: `simulate` runs it on a batch of one
plan (model.py formats the report), `explore` on millions of designs. Exact counts come from
counts.py; this file adds the time model and memory.py the memory model (REFERENCE sec. 4 and 5), each
term a small function or a commented block with its unit in its name. Adding a cost term means
editing one of them (and counts.py if it is a count), nothing else.

Time of one optimizer step on one rank:
  compute     matmul FLOPs (recomputation included) at the calibrated efficiency, or reading
              the local weights three times if that is slower (roofline, per micro-step);
  elementwise memory-bound passes over the stored activations (3: written forward, read and
              their gradient written backward; attention scores left out, fused kernels never
              write them), Sinkhorn's balancing passes, dropout's masks;
  overhead    fixed host time per block, per router, per local expert, per all-to-all call
              (sim/overhead.py; 0 unless calibrated), or the operator database's host time
              per op and per tensor-parallel collective (DTensor's dispatch around it);
  a2a         expert dispatch and combine, and BASE's token shuffle, over the topology;
  tp / pp     tensor-parallel all-reduces (or sequence parallelism's all-gathers and
              reduce-scatters) over the topology, pipeline stage sends and the schedule's host
              time per micro-batch and stage (calibrated); a single plan's bubble follows its
              real stages (sim/stages.py pipeline_time), a sweep's the average stage;
  grad sync   ZeRO 0/1: DDP all-reduce of dense gradients over dp (`overlap` of it hidden
              behind backward; none with tp or pp, whose flat all-reduce follows the schedule)
              and the expert all-reduce over dp/ep after backward (exposed);
              ZeRO-1 all-gathers the updated parameters after the step (exposed); ZeRO 2/3
              (FSDP2): every micro-step reduce-scatters gradients and all-gathers parameters
              (twice at stage 3), `overlap` hidden by prefetching;
  bubble      (pp-1)/(v*m+pp-1) of the pipelined part (v stages per rank);  optimizer: AdamW's memory-bound update.

Collectives: on a fixed rank set a collective's time is affine in bytes (busiest link's load
over bandwidth plus the slowest path's latency), so `CollectiveCosts` fits t = a + bytes * b
once per distinct rank set from the topology graph and applies it to whole arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moespec.sim.backend import Backend
from moespec.sim.collectives import all_gather_time_s, all_reduce_time_s, all_to_all_time_s, reduce_scatter_time_s
from moespec.sim.counts import FULL, TP_COLLECTIVES, a2a_transfers, compute_bytes, exact_counts, expert_rows, state_bytes, where_any
from moespec.sim.design import PRECISIONS, ROUTER_NAMES, DesignBatch, parts
from moespec.sim.memory import GRAD_BUCKET_BYTES, ddp_wraps, expert_grad_buckets, largest_tensors, memory
from moespec.sim.tensors import expert_tensors
from moespec.sim.overhead import ELEMENTWISE_PASSES
from moespec.sim.topology import build_topology
from moespec.spec.stages import PP_SCHEDULES

DEFAULT_OVERLAP = 0.5  # share of data-parallel gradient traffic hidden behind the backward pass
_TIMES = ("compute_s", "elementwise_s", "overhead_s", "a2a_s", "tp_comm_s", "pp_comm_s", "allreduce_s",
          "exposed_allreduce_s", "zero_comm_s", "bubble_s", "optimizer_s", "step_s", "tokens_per_s", "mfu")  # fmt: skip
_COLLECTIVES = {"a2a": all_to_all_time_s, "all_reduce": all_reduce_time_s, "all_gather": all_gather_time_s,
                "reduce_scatter": reduce_scatter_time_s}  # fmt: skip


@dataclass(frozen=True)
class RankSets:
    """The rank set of every design (ranks 0, stride, ..., (n-1)*stride), as an index into
    the few distinct sets of the batch, so that each collective's fit is looked up once."""

    keys: np.ndarray  # distinct (stride, n) pairs, [K, 2]
    index: np.ndarray  # set of each design, into keys; shape of the arrays given
    n: np.ndarray  # ranks in each design's set


class CollectiveCosts:
    """Affine collective times on one backend's topology, t = latency_s + bytes * s_per_byte,
    one (latency_s, s_per_byte) per distinct (kind, rank set), computed on first use. Build
    one per backend and pass it to every `evaluate` call of a sweep."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._graph, self._graph_nodes = None, 0
        self._fits: dict[tuple, tuple[float, float]] = {}

    def graph_for(self, last_rank: int):
        """The topology graph of the first nodes up to `last_rank`'s, built on first need: a
        described cluster of 65,536 nodes costs what the designs use, not a graph of every
        device. A ring is the whole ring (its paths depend on its length)."""
        per_node = self.backend.devices_per_node
        nodes = self.backend.nodes if self.backend.topology == "ring" else min(self.backend.nodes, last_rank // per_node + 1)
        if self._graph is None or nodes > self._graph_nodes:
            import dataclasses

            trimmed = self.backend if nodes == self.backend.nodes else dataclasses.replace(self.backend, nodes=nodes)
            self._graph, self._graph_nodes = build_topology(trimmed), nodes
        return self._graph

    def rank_sets(self, stride: np.ndarray, n: np.ndarray) -> RankSets:
        """Index the designs' rank sets (distinct sets found by counting: O(N), no sort)."""
        stride, n = np.broadcast_arrays(np.asarray(stride, dtype=np.int64), np.maximum(np.asarray(n, dtype=np.int64), 1))
        if stride.size == 0:
            return RankSets(np.zeros((0, 2), dtype=np.int64), np.zeros(stride.shape, dtype=np.int64), n)
        width = int(n.max()) + 1
        key = stride * width + n
        present = np.flatnonzero(np.bincount(key.ravel())) if int(key.max()) < 1 << 22 else np.unique(key)
        slot = np.zeros(int(present[-1]) + 1, dtype=np.int64)
        slot[present] = np.arange(len(present))
        return RankSets(np.stack([present // width, present % width], axis=1), slot[key], n)

    def time_s(self, kind: str, sets: RankSets, nbytes: np.ndarray) -> np.ndarray:
        """`kind` (a2a, all_reduce, all_gather, reduce_scatter) of `nbytes` (collectives.py's
        meaning for that kind) over each design's rank set; 0 where nothing is sent."""
        latency_s, s_per_byte = self.affine(kind, sets)
        return np.where(nbytes > 0, latency_s + nbytes * s_per_byte, 0.0)

    def affine(self, kind: str, sets: RankSets) -> tuple[np.ndarray, np.ndarray]:
        """(latency_s, s_per_byte) of `kind` over each design's rank set: a term of several
        calls of the same set costs one lookup (calls * latency_s + bytes * s_per_byte)."""
        latency_s, s_per_byte = np.zeros(len(sets.keys)), np.zeros(len(sets.keys))
        for i, (stride, n) in enumerate(sets.keys):
            if stride * (n - 1) < self.backend.num_devices:  # a set past the backend: only invalid designs
                latency_s[i], s_per_byte[i] = self._fit(kind, int(stride), int(n))
        return latency_s[sets.index], s_per_byte[sets.index]

    def all_to_all_s(self, ep: np.ndarray, bytes_per_pair: np.ndarray) -> np.ndarray:
        """all_to_all_time_s over ranks 0..ep-1 (an expert-parallel group)."""
        return self.time_s("a2a", self.rank_sets(1, ep), bytes_per_pair)

    def _fit(self, kind: str, stride: int, n: int) -> tuple[float, float]:
        if (kind, stride, n) not in self._fits:
            ranks = list(range(0, stride * n, stride))

            graph = self.graph_for(ranks[-1])

            def time_s(v):
                return _COLLECTIVES[kind](graph, ranks, v)

            small, large = 1.0, 2.0**30
            s_per_byte = (time_s(large) - time_s(small)) / (large - small)
            latency_s = time_s(small) - small * s_per_byte
            probe = 3.0 * 2**20
            # 1e-9: the fit's own rounding is ~1e-15 relative; a non-affine cost would miss by O(1)
            if abs(latency_s + probe * s_per_byte - time_s(probe)) > 1e-9 * time_s(probe):
                raise ValueError(f"{kind} over ranks {ranks[:4]}... on {self.backend.name} is not affine in bytes")
            self._fits[kind, stride, n] = (latency_s, s_per_byte)
        return self._fits[kind, stride, n]


def evaluate(batch: DesignBatch, backend: Backend, *, overlap: float = DEFAULT_OVERLAP, imbalance: float = 1.0,
             a2a_imbalance: float | None = None, collectives: CollectiveCosts | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Every figure for every design, as (N,) arrays.

    Counts (counts.py, int64 or float64 past 2**62): params_total, params_active,
    params_embedding, step_flops and flops_<part> (one micro-step, one rank), a2a_bytes and
    shuffle_a2a_bytes (one micro-step, one rank), a2a_calls, model_flops_per_token. State
    held at rest (bytes, float64): state_{params, grads, optimizer}_bytes. Memory per device
    (bytes): memory_{weights, gathered_weights, grads, optimizer, activations, a2a_buffers,
    allowance, total}_bytes and `fits`. Time (s): see the module docstring, plus step_s,
    tokens_per_s, mfu. `valid` is False where the design needs more devices than the backend
    has or ep does not divide dp; its times are NaN.

    Load (sim/load.py): dropless experts wait for the busiest rank, `imbalance` times the mean
    rows; their all-to-all for the busiest sender or receiver, `a2a_imbalance` (default: the
    same) times the balanced rows. Capacity layers and BASE (exactly balanced) are fixed.
    """
    a2a_imbalance = imbalance if a2a_imbalance is None else a2a_imbalance
    if not (imbalance >= 1 and a2a_imbalance >= 1):
        raise ValueError(f"imbalance is max/mean load, so at least 1; got {imbalance} (all-to-all {a2a_imbalance})")
    collectives = collectives or CollectiveCosts(backend)
    if collectives.backend != backend:
        raise ValueError(f"collectives were built for backend {collectives.backend.name}, not {backend.name}")
    out = exact_counts(batch)
    state = state_bytes(batch, out)
    state["elementwise_activations"] = elementwise_activation_bytes(batch)
    state["largest_tensors"] = largest_tensors(batch)  # (expert bank, FFN/attention matrix, table) elements
    state["expert_buckets"] = expert_grad_buckets(state["largest_tensors"][0], expert_tensors(batch))
    out.update({f"state_{name}_bytes": state[name] for name in ("params", "grads", "optimizer")})
    out.update(memory(batch, backend, out, state))
    out.update(_time(batch, backend, out, state, collectives, overlap=overlap, imbalance=imbalance, a2a_imbalance=a2a_imbalance))
    return out


def elementwise_activation_bytes(b: DesignBatch) -> np.ndarray:
    """Bytes of activations the elementwise ops pass over per micro-step (the time model's
    memory-bound term, whose bandwidth the calibration measures against this figure):
    Korthikanti et al. 2022's per-block count without the attention scores (fused attention
    never writes them), 15*s*b*h plus 19*s*b*h per 4h of MLP width, a MoE block's MLP scaled
    by the rows its experts see per token and their width; fp32 doubles it. What a rank
    keeps for backward is counted exactly elsewhere (sim/activations.py). Tensor parallelism
    (Korthikanti et al.'s split): of the 15 per block, the norms, q/k/v's input and a mask (7)
    stay whole on every tp rank and the per-head 8 divide by tp; split FFNs divide by tp,
    routed experts stay whole; sequence parallelism divides the whole block part too."""
    layers = b.table
    s, bsz, h = (x.astype(np.float64) for x in (b.seq_len, b.micro_batch, b.d_model))
    sbh = s * bsz * h
    tp = b.tp.astype(np.float64)
    scale = np.where(b.precision == PRECISIONS.index("fp32"), 2, 1) / b.pp
    rows_per_token = expert_rows(b, layers) / layers.lift(s * bsz)
    split = layers.shared_count * layers.shared_d_ff + layers.d_ff  # placeholders zero the other kind
    widths = layers.per_design(layers.count * (rows_per_token * layers.expert_d_ff + split / layers.lift(tp)), len(b)) + b.dense_blocks * b.d_ff / tp
    cross = where_any(b.cross_len > 0, lambda: 4 * sbh + 2 * bsz * b.cross_len * h, 0.0)  # cross-attention: its norm, q, output; k, v over the encoder's rows
    attention = np.where(b.sequence_parallel & (b.tp > 1), 15 / tp, 7 + 8 / tp) * sbh
    # an LSTM layer: its gates' add and four activations over 4D, the cell's products, sum and tanh, the output product
    block = where_any(b.lstm, 20 * sbh, attention + cross)
    own = (b.n_layers * block + 19 * sbh / (4 * h) * widths) * scale
    return own + (0.0 if b.encoder is None else elementwise_activation_bytes(b.encoder))


def elementwise_bytes(b: DesignBatch, passed: np.ndarray) -> np.ndarray:
    """Bytes one micro-step's non-matmul ops move on one rank: 3 passes over the activations
    they touch (`passed`, elementwise_activation_bytes: written forward, read and their gradient written
    backward; full recomputation replays the forward's third again); Sinkhorn's iterations
    (2 normalisations of the [T, E] fp32 matrix, ~3 passes each, forward only, again when
    replayed); dropout's masks (each dropout reads and writes its [T, D] input forward and
    backward, 4 passes, and a 1-byte mask written and read: 2 residual dropouts per block,
    one on the embeddings, and one on the attention probabilities)."""
    layers = b.table
    full = b.recompute == FULL
    stored = ELEMENTWISE_PASSES * passed * np.where(full, 4 / 3, 1.0)
    tokens = (b.micro_batch * b.seq_len).astype(np.float64)
    sinkhorn = layers.per_design(layers.count * layers.sinkhorn_iterations * 2 * 3 * layers.lift(tokens) * layers.experts * 4.0, len(b))
    sinkhorn = sinkhorn * np.where(full, 2, 1)
    per_element = 4 * compute_bytes(b) + 2
    dropout = (2 * b.n_layers + 1) * tokens * b.d_model * per_element
    scores = where_any(b.lstm, 0.0, b.micro_batch * b.n_heads * b.seq_len.astype(np.float64) * (b.seq_len + b.cross_len))  # attention probabilities
    dropout = dropout + b.n_layers * scores * per_element
    encoder = 0.0 if b.encoder is None else elementwise_bytes(b.encoder, 0.0)  # its activations are in `passed` already
    return stored + (sinkhorn + np.where(b.dropout > 0, dropout, 0.0)) / b.pp + encoder  # tp: routers whole; dropout refused


# --- time --------------------------------------------------------------------------------------


def _op_times(b: DesignBatch, db, state: dict, *, imbalance: float) -> tuple[np.ndarray, ...]:
    """(matmul + attention, memory-bound, host seconds) of one micro-step and the optimizer
    step's seconds, from the operator database: each op family of sim/ops.py at its measured
    cost. Elementwise bytes are the activation passes (`elementwise_bytes`) at the measured
    elementwise bandwidth plus dispatch/combine rows at the gather bandwidth."""
    from moespec.sim import ops

    linear_s, attention_s, host_ops, gathered, auction = 0.0, 0.0, 0.0, 0.0, 0.0
    for part in parts(b):  # an encoder-decoder's encoder stack runs its own ops
        part_linear_s, part_attention_s = ops.linear_and_attention_s(part, db, imbalance=imbalance)
        linear_s, attention_s = linear_s + part_linear_s, attention_s + part_attention_s
        host_ops, gathered, auction = host_ops + ops.other_ops(part)[0], gathered + ops.gather_bytes(part, db), auction + ops.auction_s(part, db)
    replay = np.where(b.recompute == FULL, 4 / 3, 1.0)
    elementwise_s = elementwise_bytes(b, state["elementwise_activations"]) / db.bandwidth_Bps + gathered * replay / db.gather_Bps
    host_s = host_ops * db.op_s * replay + auction
    optimizer_s = ops.optimizer_s(b, db, state["params"] / 4) + db.step_s  # the training loop's own host time, once per optimizer step
    return linear_s + attention_s, elementwise_s, host_s, optimizer_s


@np.errstate(divide="ignore", invalid="ignore")
def _time(b: DesignBatch, backend: Backend, counts: dict, state: dict, collectives: CollectiveCosts, *,
          overlap: float, imbalance: float, a2a_imbalance: float) -> dict[str, np.ndarray]:  # fmt: skip
    n = len(b)
    world = b.dp * b.tp * b.pp
    valid = (world <= backend.num_devices) & (b.dp % b.ep == 0)
    peak = np.array([backend.device.peak_flops_per_s.get(name, np.nan) for name in PRECISIONS])[b.precision]
    bpe = compute_bytes(b).astype(np.float64)
    micro_steps = b.global_batch // (b.micro_batch * b.dp)
    shard = b.tp * b.pp
    memory_Bps = backend.device.memory_bandwidth_Bps * backend.memory_efficiency
    dense, expert = state["full_dense"], state["full_expert"]  # elements of a rank's dense and expert parameters

    if backend.ops is not None:  # the operator database (sim/opdb.py) along the step's op list (sim/ops.py)
        compute_s, elementwise_s, overhead_s, optimizer_s = _op_times(b, backend.ops, state, imbalance=imbalance)
        compute_s, elementwise_s, overhead_s = compute_s * micro_steps, elementwise_s * micro_steps, overhead_s * micro_steps / b.pp
    else:
        # Compute: roofline per micro-step. Dropless experts wait for the busiest rank (`imbalance`).
        replay = np.where(b.recompute == FULL, 4 / 3, 1.0)
        flops = (counts["step_flops"] - counts["tp_saved_flops"] + (imbalance - 1) * counts["flops_experts_dropless"] * replay) / b.pp
        weights_s = 3 * (dense + expert) * bpe / memory_Bps
        compute_s = np.maximum(flops / (peak * backend.matmul_efficiency), weights_s) * micro_steps
        elementwise_s = elementwise_bytes(b, state["elementwise_activations"]) / memory_Bps * micro_steps
        optimizer_s = 2 * 16 * (state["optimizer"] / 8) / memory_Bps  # AdamW reads and writes p, g, m, v
        overhead_s = np.zeros(n)
    if backend.ops is None:  # fixed host time (sim/overhead.py): per micro-step and stage, plus the optimizer step's
        ov = backend.overheads
        fixed_s = ov.step_s
        for part in parts(b):
            layers, ep = part.table, part.table.lift(b.ep)
            a2a_calls = np.where(ep > 1, layers.lift(a2a_transfers(b)) * np.where(layers.shuffle, 2, 1), 0)
            moe_s = np.array([ov.moe_layer(name) for name in ROUTER_NAMES])[layers.router] + ov.local_expert_s * layers.experts / ep
            per_block_s = np.where(layers.moe, moe_s + ov.a2a_call_s * a2a_calls, ov.dense_layer_s)
            fixed_s = fixed_s + layers.per_design(layers.count * per_block_s, n) + part.dense_blocks * ov.dense_layer_s
        overhead_s = fixed_s / b.pp * micro_steps + ov.optimizer_step_s

    # All-to-all: each rank sends rows*D*b/ep to every other rank of its group per transfer;
    # BASE's shuffle T/ep tokens of D*b bytes. Per layer, per micro-step of its stage.
    a2a_s = np.zeros(n)
    for part in parts(b):
        layers = part.table
        lift, ep = layers.lift, layers.lift(b.ep)
        ep_sets = collectives.rank_sets(1, ep)  # an expert-parallel group: ep consecutive ranks
        on = lift(valid) & layers.moe & (ep > 1)
        skew = np.where(layers.dropless & ~layers.balanced, a2a_imbalance, 1.0)
        row_bytes = lift(b.d_model * bpe)
        tokens = lift(part.micro_batch * part.seq_len)
        dispatch = collectives.time_s("a2a", ep_sets, np.where(on, expert_rows(part, layers) * skew * row_bytes / ep, 0.0))
        shuffle = collectives.time_s("a2a", ep_sets, np.where(on & layers.shuffle, tokens / ep * row_bytes, 0.0))
        a2a_s = a2a_s + layers.per_design(layers.count * lift(a2a_transfers(b)) * (dispatch + shuffle), n) * micro_steps / b.pp
    if backend.ops is not None:  # each call's wait for the slowest rank (operator database)
        a2a_s = a2a_s + counts["a2a_calls"] * backend.ops.a2a_call_s * micro_steps / b.pp

    # Tensor parallel (distributed/tensor_parallel.py): the all-reduces of the split modules'
    # outputs and input gradients, or under sequence parallelism their all-gathers and
    # reduce-scatters (counts.py counts each kind and its bytes per micro-step), over the tp
    # ranks; affine in bytes, so calls x t(mean bytes). Pipeline: a pair exchange between
    # neighbouring stages (the rank's slice of the sequence under sequence parallelism).
    tp_comm_s, pp_comm_s = np.zeros(n), np.zeros(n)  # most sweeps have neither: skip the lookups
    if (b.tp > 1).any():
        tp_sets = collectives.rank_sets(1, b.tp)
        for kind in TP_COLLECTIVES:
            calls = counts[f"tp_{kind}_calls"].astype(np.float64)
            per_call = counts[f"tp_{kind}_bytes"] / np.maximum(calls, 1) * np.where(kind == "all_gather", b.tp, 1)  # an all-gather's output
            tp_comm_s = tp_comm_s + calls / b.pp * micro_steps * collectives.time_s(kind, tp_sets, np.where(valid & (calls > 0), per_call, 0.0))
            if backend.ops is not None:  # host time around each call: DTensor's dispatch of the split module, the wait (operator database)
                overhead_s = overhead_s + calls / b.pp * micro_steps * backend.ops.tp_call_s
    if (b.pp > 1).any():  # the residual stream is float32 (distributed/pipeline.py stage_shapes); each tp rank sends its copy
        sent = 4.0 * b.micro_batch * b.seq_len * b.d_model / np.where(b.sequence_parallel & (b.tp > 1), b.tp, 1)
        pp_comm_s = 2 * micro_steps * collectives.time_s(
            "a2a", collectives.rank_sets(b.tp, 2), np.where(valid & (b.pp > 1), sent, 0.0))
        if backend.ops is not None:  # the schedule's host time per micro-batch and stage (operator database)
            stages = np.where(b.pp_schedule == PP_SCHEDULES.index("interleaved_1f1b"), 2, 1)
            pp_comm_s = pp_comm_s + np.where(b.pp > 1, micro_steps * stages * backend.ops.pp_micro_s, 0.0)

    # Data-parallel gradient traffic (fp32 gradients and parameters, 4 bytes): dense over
    # the dp ranks (every tp*pp-th), experts over their replicas (every tp*pp*ep-th).
    edp = b.dp // b.ep
    dp_sets, edp_sets = collectives.rank_sets(shard, b.dp), collectives.rank_sets(shard * b.ep, edp)
    dense_bytes, expert_bytes = 4 * dense, 4 * expert

    # On a ring (collectives.py) an all-gather and a reduce-scatter are one pass of n-1 steps
    # of bytes/n, an all-reduce two such passes: every term below is a multiple of `ring`,
    # `calls` collectives moving `nbytes` in all (each call's latency, the bytes once).
    fits = {id(sets): collectives.affine("reduce_scatter", sets) for sets in (dp_sets, edp_sets)}

    def ring(mask, sets, nbytes, calls=1.0):
        latency_s, s_per_byte = fits[id(sets)]
        return np.where(mask & valid & (sets.n > 1) & (nbytes > 0), calls * latency_s + nbytes * s_per_byte, 0.0) * backend.allreduce_scale

    ddp, zero1, fsdp = b.zero_stage <= 1, b.zero_stage == 1, b.zero_stage >= 2
    # Gradient all-reduces: DDP's 25 MiB buckets for the dense gradients (the runtime's
    # buckets under tp or pp are taken as the same); the expert gradients one call per bank
    # of 1 MiB or more, else per bucket (distributed/data_parallel.py all_reduce_buckets).
    dense_ar = 2 * ring(ddp, dp_sets, dense_bytes, np.maximum(np.ceil(dense_bytes / GRAD_BUCKET_BYTES), 1.0))
    expert_ar = 2 * ring(ddp, edp_sets, expert_bytes, np.maximum(state["expert_buckets"][0], 1.0))
    allreduce_s = dense_ar + expert_ar
    # ZeRO-1 and FSDP2: one collective per unit (each block, the root; expert banks over dp/ep
    # apart). ZeRO-1 all-gathers after the step; FSDP2 reduce-scatters and all-gathers (twice
    # at stage 3) every micro-step.
    units = np.maximum(sum(part.n_layers for part in parts(b)) + 1, 1)
    banks = np.maximum(sum(part.n_moe_layers for part in parts(b)), 1)
    gather = ring(zero1, dp_sets, dense_bytes, units) + ring(zero1, edp_sets, expert_bytes, banks)
    passes = np.where(b.zero_stage == 3, 3, 2)
    fsdp_s = passes * micro_steps * (ring(fsdp, dp_sets, dense_bytes, units) + ring(fsdp, edp_sets, expert_bytes, banks))
    zero_s = gather + fsdp_s
    # DDP overlaps the dense all-reduce with backward; with tp or pp the runtime reduces the
    # dense gradients in one flat all-reduce after the schedule (distributed/model_parallel.py)
    hidden = np.where(ddp_wraps(b), overlap, 0.0)  # (dense_ar is 0 where dp is 1 or ZeRO >= 2)
    exposed_s = (1 - hidden) * dense_ar + (1 - overlap) * fsdp_s + expert_ar + gather

    pipelined_s = compute_s + elementwise_s + overhead_s + a2a_s + tp_comm_s
    # idle share of a stage: (pp-1) / (v*m + pp-1) with v stages per rank (Narayanan et al. 2021:
    # interleaving v chunks per rank divides the bubble by v); GPipe and 1F1B: v = 1
    virtual = np.where(b.pp_schedule == PP_SCHEDULES.index("interleaved_1f1b"), 2, 1)
    bubble_s = np.where(b.pp > 1, (b.pp - 1) / (virtual * micro_steps + b.pp - 1) * pipelined_s, 0.0)
    step_s = compute_s + elementwise_s + overhead_s + a2a_s + tp_comm_s + pp_comm_s + exposed_s + bubble_s + optimizer_s
    tokens_per_s = b.global_batch * (b.seq_len + b.cross_len) / step_s  # an encoder-decoder's: inputs and targets
    mfu = counts["model_flops_per_token"] * tokens_per_s / (world * peak)
    times = dict(zip(_TIMES, (compute_s, elementwise_s, overhead_s, a2a_s, tp_comm_s, pp_comm_s, allreduce_s, exposed_s,
                              zero_s, bubble_s, optimizer_s, step_s, tokens_per_s, mfu)))  # fmt: skip
    if valid.all():  # the common case: no NaN to spread
        return {"valid": valid} | times
    nan_if_invalid = np.where(valid, 1.0, np.nan)
    return {"valid": valid} | {name: value * nan_if_invalid for name, value in times.items()}
