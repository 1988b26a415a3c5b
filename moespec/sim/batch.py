"""Vectorised simulator: counts.py + model.py evaluated for many designs at once (numpy).

The explorer sweeps thousands to millions of designs that differ in a few numbers (experts,
top-k, capacity factor, parallel degrees, micro-batch, ZeRO stage). A `DesignBatch` holds one
numpy array per varying field, one entry per design; `evaluate(batch, backend)` returns the
figures `simulate()` reports, as arrays. The formulas are the scalar ones, term by term, in
the same order where floating point rounding could tell; tests/test_sim_batch.py checks every
figure against `simulate()` on the shipped specs and on random perturbations.

Scope: a design's MoE layers all share one configuration and its dense layers one width (the
common case for sweeps); `DesignBatch.from_plans` refuses other plans.

Integers: counts (parameters, FLOPs, all-to-all bytes) are exact int64, as counts.py's Python
integers are, while every design of the batch stays below 2**62; a count that could exceed that
(1M-token contexts: 12*B*H*S^2*hd per layer) is returned as float64 for the whole batch, and the
memory and time models always run on float64, as the scalar model does once it divides.

Collectives: on a fixed rank set, `all_to_all_time_s` and `all_reduce_time_s` are affine in
bytes (busiest link's load / bandwidth + the slowest path's latency, both linear or constant),
so `CollectiveCosts` computes t = latency_s + bytes * s_per_byte once per distinct rank set
(from the same topology graph and functions the scalar model calls, checked affine at a third
volume) and applies it to the whole batch.

Shape legend: N designs; every array in a `DesignBatch` and every result is shape (N,).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moespec.sim.backend import Backend
from moespec.sim.collectives import all_reduce_time_s, all_to_all_time_s
from moespec.sim.model import ALLOCATOR_ALLOWANCE, DEFAULT_OVERLAP
from moespec.sim.overhead import A2A_CALLS_PER_LAYER, ELEMENTWISE_PASSES, ROUTER_NAMES
from moespec.sim.topology import build_topology
from moespec.spec.plan import SpecPlan

PRECISIONS = ("fp32", "bf16", "fp16")  # DesignBatch.precision codes
RECOMPUTE = ("none", "selective", "full")  # DesignBatch.recompute codes
EXACT_LIMIT = 2.0**62  # counts at or above this come back as float64 (int64 would overflow)

_BOOL_FIELDS = ("gated", "layernorm", "learned_positions", "tied", "qkv_bias", "shared_gate", "router_bias",
                "dropless", "balanced")  # fmt: skip
_FLOAT_FIELDS = ("capacity_factor",)


@dataclass(frozen=True)
class DesignBatch:
    """One entry per design; all arrays shape (N,). Model, then MoE layer, then parallelism."""

    vocab: np.ndarray
    d_model: np.ndarray
    n_layers: np.ndarray
    n_heads: np.ndarray
    n_kv_heads: np.ndarray
    head_dim: np.ndarray
    d_ff: np.ndarray  # dense FFN width (every dense layer)
    gated: np.ndarray  # swiglu / geglu: 3 FFN matrices, else 2
    layernorm: np.ndarray  # 2*D parameters per norm, else (rmsnorm) D
    learned_positions: np.ndarray
    tied: np.ndarray
    qkv_bias: np.ndarray
    seq_len: np.ndarray
    n_moe_layers: np.ndarray  # MoE blocks; the other n_layers - n_moe_layers are dense
    experts: np.ndarray  # E routed experts
    expert_d_ff: np.ndarray
    k: np.ndarray  # experts per token (router.experts_per_token)
    shared_count: np.ndarray
    shared_d_ff: np.ndarray
    shared_gate: np.ndarray
    router: np.ndarray  # index into ROUTER_NAMES (per-router host overhead)
    router_matrices: np.ndarray  # D x E router matrices: 0 hash, 2 noisy_topk, 1 the others
    router_bias: np.ndarray  # an E-vector bias on the gate (only where router_matrices > 0)
    capacity_factor: np.ndarray  # training factor; ignored where dropless
    min_capacity: np.ndarray
    dropless: np.ndarray  # capacity is None (BASE), dropless, or factor None: T*k expert rows
    balanced: np.ndarray  # BASE: exactly balanced, so `imbalance` does not apply
    dp: np.ndarray
    ep: np.ndarray
    tp: np.ndarray
    pp: np.ndarray
    micro_batch: np.ndarray
    global_batch: np.ndarray
    precision: np.ndarray  # index into PRECISIONS
    zero_stage: np.ndarray
    recompute: np.ndarray  # index into RECOMPUTE

    def __post_init__(self) -> None:
        lengths = {f.name: np.shape(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
            raise ValueError(f"every DesignBatch field is one (N,) array; got shapes {lengths}")

    def __len__(self) -> int:
        return len(self.vocab)

    def take(self, index) -> DesignBatch:
        """The designs at `index` (integer array, slice or boolean mask), as a new batch."""
        return DesignBatch(**{f.name: np.atleast_1d(getattr(self, f.name)[index]) for f in dataclasses.fields(self)})

    def replace(self, **arrays) -> DesignBatch:
        """A batch with some fields swapped; scalars broadcast to N, arrays must be (N,)."""
        n = len(self)
        cast = {name: _column(name, np.broadcast_to(value, (n,))) for name, value in arrays.items()}
        return dataclasses.replace(self, **cast)

    @classmethod
    def from_plans(cls, plans) -> DesignBatch:
        """Pack resolved plans; ValueError for a plan whose MoE (or dense) layers differ."""
        rows = [_row(plan) for plan in plans]
        if not rows:
            raise ValueError("from_plans needs at least one plan")
        return cls(**{name: _column(name, [row[name] for row in rows]) for name in rows[0]})

    @classmethod
    def sweep(cls, plan: SpecPlan, **arrays) -> DesignBatch:
        """`plan` repeated, with the given fields varied: `sweep(plan, experts=E_N, ep=ep_N)`."""
        n = max((np.size(value) for value in arrays.values()), default=1)
        return cls.from_plans([plan]).take(np.zeros(n, dtype=np.int64)).replace(**arrays)


def _column(name: str, values) -> np.ndarray:
    dtype = bool if name in _BOOL_FIELDS else np.float64 if name in _FLOAT_FIELDS else np.int64
    return np.array(values, dtype=dtype)  # a copy: a batch never aliases the caller's arrays


def _row(plan: SpecPlan) -> dict:
    m, p = plan.model, plan.parallel
    dense_widths = {layer.d_ff for layer in plan.layers if layer.moe is None}
    moe_configs = {layer.moe for layer in plan.moe_layers}
    if len(moe_configs) > 1:
        indices = [layer.index for layer in plan.moe_layers]
        raise ValueError(f"{plan.name}: layers {indices} hold {len(moe_configs)} different MoE configurations; "
                         "DesignBatch needs every MoE layer alike (evaluate such a plan with moespec.sim.model)")  # fmt: skip
    if len(dense_widths) > 1:
        raise ValueError(f"{plan.name}: dense layers have widths {sorted(dense_widths)}; DesignBatch needs one")
    row = {
        "vocab": m.vocab_size, "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
        "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim, "d_ff": dense_widths.pop() if dense_widths else m.d_ff,
        "gated": m.activation in ("swiglu", "geglu"), "layernorm": m.norm == "layernorm",
        "learned_positions": m.positions == "learned", "tied": m.tied_embeddings, "qkv_bias": m.qkv_bias,
        "seq_len": m.seq_len, "n_moe_layers": len(plan.moe_layers),
        "dp": p.dp, "ep": p.ep, "tp": p.tp, "pp": p.pp, "micro_batch": p.micro_batch, "global_batch": p.global_batch,
        "precision": PRECISIONS.index(p.precision), "zero_stage": p.zero_stage, "recompute": RECOMPUTE.index(p.recompute),
    }  # fmt: skip
    if not moe_configs:  # a dense model: harmless MoE placeholders, multiplied by 0 layers
        return row | {"experts": 1, "expert_d_ff": 0, "k": 1, "shared_count": 0, "shared_d_ff": 0,
                      "shared_gate": False, "router": 0, "router_matrices": 0, "router_bias": False, "capacity_factor": 1.0,
                      "min_capacity": 0, "dropless": True, "balanced": False}  # fmt: skip
    moe = moe_configs.pop()
    router, experts, capacity = moe.router, moe.experts, moe.capacity
    matrices = {"hash": 0, "noisy_topk": 2}.get(router.type, 1)
    dropless = capacity is None or capacity.dropless or capacity.factor is None
    return row | {
        "router": ROUTER_NAMES.index(router.type), "experts": experts.count, "expert_d_ff": experts.d_ff, "k": router.experts_per_token,
        "shared_count": experts.shared_count, "shared_d_ff": experts.shared_d_ff, "shared_gate": experts.shared_gate,
        "router_matrices": matrices, "router_bias": matrices > 0 and bool(getattr(router, "bias", False)),
        "capacity_factor": 0.0 if dropless else capacity.factor, "min_capacity": 0 if capacity is None else capacity.min_capacity,
        "dropless": dropless, "balanced": router.type == "base",
    }  # fmt: skip


# --- counts (counts.py) ----------------------------------------------------------------------


def _counts(b: DesignBatch, dtype) -> dict[str, np.ndarray]:
    """counts.py's closed forms in `dtype` (int64: exact; float64: the overflow-safe twin)."""

    def c(x):
        return x.astype(dtype)

    d, v, s = c(b.d_model), c(b.vocab), c(b.seq_len)
    n_moe = c(b.n_moe_layers)
    n_dense = c(b.n_layers) - n_moe
    matrices = np.where(b.gated, 3, 2).astype(dtype)
    norm = np.where(b.layernorm, 2 * d, d)
    e, f, k = c(b.experts), c(b.expert_d_ff), c(b.k)
    q_width, kv_width = c(b.n_heads) * c(b.head_dim), c(b.n_kv_heads) * c(b.head_dim)

    # Parameters (predict_params, layer_params)
    attention = d * (q_width + 2 * kv_width) + q_width * d + np.where(b.qkv_bias, q_width + 2 * kv_width, 0)
    block = attention + 2 * norm
    dense_layer = block + matrices * d * c(b.d_ff)
    routed = e * matrices * d * f
    shared = c(b.shared_count) * matrices * d * c(b.shared_d_ff) + np.where((b.shared_count > 0) & b.shared_gate, d, 0)
    router = d * e * c(b.router_matrices) + np.where(b.router_bias & (b.router_matrices > 0), e, 0)
    moe_total = block + router + routed + shared
    moe_active = moe_total - routed + routed * k // e
    embedding = v * d + np.where(b.learned_positions, s * d, 0)
    outer = embedding + np.where(b.tied, 0, v * d) + norm
    params_total = outer + n_dense * dense_layer + n_moe * moe_total
    params_active = outer + n_dense * dense_layer + n_moe * moe_active

    # FLOPs of one micro-step on one rank (step_flops_by_part)
    batch = c(b.micro_batch)
    t = batch * s
    rows = _expert_rows(b).astype(dtype)  # E*C with capacity, T*k dropless
    attention_flops = 6 * t * d * (2 * q_width + 2 * kv_width) + 12 * batch * c(b.n_heads) * s**2 * c(b.head_dim)
    dense_flops = attention_flops + 6 * t * d * c(b.d_ff) * matrices
    expert_flops = 6 * rows * d * f * matrices
    shared_flops = np.where(b.shared_count > 0, 6 * t * d * c(b.shared_count) * c(b.shared_d_ff) * matrices
                            + np.where(b.shared_gate, 6 * t * d, 0), 0)  # fmt: skip
    moe_flops = attention_flops + 6 * t * d * e * c(b.router_matrices) + expert_flops + shared_flops
    lm_head = 6 * batch * s * d * v
    step_flops = lm_head + n_dense * dense_flops + n_moe * moe_flops

    # All-to-all bytes per rank per micro-step (predict_a2a_bytes)
    ep, bpe = c(b.ep), _bytes_per_element(b).astype(dtype)
    a2a_bytes = np.where(b.ep > 1, n_moe * (4 * rows * d * bpe * (ep - 1) // ep), 0)

    # Model FLOPs per token, for MFU (model_flops_per_token_of)
    active_matmul = params_active - embedding + np.where(b.tied, embedding, 0)
    model_flops_per_token = 6 * active_matmul + 12 * c(b.n_layers) * c(b.n_heads) * c(b.head_dim) * s
    return {
        "params_total": params_total, "params_active": params_active, "params_embedding": embedding,
        "expert_params": n_moe * routed, "expert_rows": rows, "step_flops": step_flops,
        "dropless_expert_flops": np.where(b.dropless, n_moe * expert_flops, 0), "a2a_bytes": a2a_bytes,
        "model_flops_per_token": model_flops_per_token,
    }  # fmt: skip


def _expert_rows(b: DesignBatch) -> np.ndarray:
    """counts.expert_rows: E * max(ceil(k*T/E*cf), min_capacity), or T*k dropless (int64)."""
    t_k = b.micro_batch * b.seq_len * b.k
    capacity = np.maximum(np.ceil(t_k / b.experts * b.capacity_factor), b.min_capacity)  # float64
    return np.where(b.dropless, t_k, b.experts * np.where(b.dropless, 0, capacity).astype(np.int64))


def _bytes_per_element(b: DesignBatch) -> np.ndarray:
    return np.where(b.precision == PRECISIONS.index("fp32"), 4, 2)


# --- collectives ----------------------------------------------------------------------------


class CollectiveCosts:
    """Affine collective times on one backend's topology, t = latency_s + bytes * s_per_byte,
    one (latency_s, s_per_byte) per distinct rank set, computed on first use. Build one per
    backend and pass it to every `evaluate` call of a sweep."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.graph = build_topology(backend)
        self._fits: dict[tuple, tuple[float, float]] = {}

    def all_to_all_s(self, ep: np.ndarray, bytes_per_pair: np.ndarray) -> np.ndarray:
        """all_to_all_time_s over ranks 0..ep-1 (an expert-parallel group), per design."""
        return self._apply("a2a", np.ones_like(ep), ep, bytes_per_pair)

    def pair_exchange_s(self, stride: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """all_to_all_time_s between ranks 0 and `stride` (neighbouring pipeline stages)."""
        return self._apply("a2a", stride, np.full_like(stride, 2), nbytes)

    def all_reduce_s(self, stride: np.ndarray, n: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """all_reduce_time_s over ranks 0, stride, ..., (n-1)*stride, per design."""
        return self._apply("all_reduce", stride, n, nbytes)

    def _apply(self, kind: str, stride: np.ndarray, n: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        keys, inverse = np.unique(stride.astype(np.int64) << 32 | n.astype(np.int64), return_inverse=True)
        fits = np.array([self._fit(kind, int(key >> 32), int(key & 0xFFFFFFFF)) for key in keys]).reshape(-1, 2)
        latency_s, s_per_byte = fits[inverse, 0], fits[inverse, 1]
        return np.where(nbytes > 0, latency_s + nbytes * s_per_byte, 0.0)  # nothing sent: no step

    def _fit(self, kind: str, stride: int, n: int) -> tuple[float, float]:
        if (kind, stride, n) not in self._fits:
            ranks = list(range(0, stride * n, stride))
            time_s = (lambda v: all_to_all_time_s(self.graph, ranks, v)) if kind == "a2a" else (lambda v: all_reduce_time_s(self.graph, ranks, v))
            small, large = 1.0, 2.0**30
            s_per_byte = (time_s(large) - time_s(small)) / (large - small)
            latency_s = time_s(small) - small * s_per_byte
            probe = 3.0 * 2**20
            # 1e-9: the fit's own rounding is ~1e-15 relative; a non-affine cost would miss by O(1)
            if abs(latency_s + probe * s_per_byte - time_s(probe)) > 1e-9 * time_s(probe):
                raise ValueError(f"{kind} over ranks {ranks[:4]}... on {self.backend.name} is not affine in bytes")
            self._fits[kind, stride, n] = (latency_s, s_per_byte)
        return self._fits[kind, stride, n]


# --- memory and time (model.py) -------------------------------------------------------------


def evaluate(batch: DesignBatch, backend: Backend, *, overlap: float = DEFAULT_OVERLAP, imbalance: float = 1.0,
             collectives: CollectiveCosts | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """`simulate()`'s figures for every design, as (N,) arrays.

    Counts: params_total, params_active, params_embedding, step_flops (one micro-step, one
    rank), a2a_bytes (one micro-step, one rank), model_flops_per_token; int64 (float64 if any
    design reaches 2**62). Memory per device (bytes, float64): memory_{weights, grads,
    optimizer, activations, a2a_buffers, allowance, total}_bytes and `fits`. Time (s, float64):
    compute_s, a2a_s, allreduce_s, exposed_allreduce_s, bubble_s, optimizer_s, step_s,
    tokens_per_s, mfu. `valid` is False where the design needs more devices than the backend
    has (the scalar step_time raises) or ep does not divide dp; its times are NaN.
    """
    if imbalance < 1:
        raise ValueError(f"imbalance is max/mean load, so at least 1; got {imbalance}")
    collectives = collectives or CollectiveCosts(backend)
    if collectives.backend != backend:
        raise ValueError(f"collectives were built for backend {collectives.backend.name}, not {backend.name}")
    exact, approx = _counts(batch, np.int64), _counts(batch, np.float64)
    out = {name: exact[name] if np.all(np.abs(approx[name]) < EXACT_LIMIT) else approx[name]
           for name in ("params_total", "params_active", "params_embedding", "step_flops", "a2a_bytes", "model_flops_per_token")}  # fmt: skip
    out.update(_memory(batch, backend, approx))
    out.update(_time(batch, backend, approx, collectives, overlap=overlap, imbalance=imbalance))
    return out


@np.errstate(divide="ignore", invalid="ignore")  # ep not dividing dp: see `valid` in _time
def _memory(b: DesignBatch, backend: Backend, counts: dict) -> dict[str, np.ndarray]:
    """model.memory_per_device: 16 bytes per parameter in mixed precision (4+4+8 in fp32), ZeRO
    over dp (dense) and dp/ep (experts), tp*pp split everything, 10% allocator allowance."""
    bpe = _bytes_per_element(b).astype(np.float64)
    dense, expert = counts["params_total"] - counts["expert_params"], counts["expert_params"]
    shard = b.tp * b.pp
    dense_local, expert_local = dense / shard, expert / b.ep / shard
    expert_dp = b.dp // b.ep
    replicated = dense_local + expert_local
    sharded = dense_local / b.dp + expert_local / expert_dp
    weights = np.where(b.zero_stage >= 3, sharded, replicated) * bpe
    grads = np.where(b.zero_stage >= 2, sharded, replicated) * bpe
    optimizer = np.where(b.zero_stage >= 1, sharded, replicated) * (16 - 2 * bpe)
    activations = _activation_bytes(b, counts)
    a2a = np.where((b.ep > 1) & (b.n_moe_layers > 0), 2.0 * counts["expert_rows"] * b.d_model * bpe, 0.0)
    counted = weights + grads + optimizer + activations + a2a
    allowance = ALLOCATOR_ALLOWANCE * counted
    total = counted + allowance
    return {
        "memory_weights_bytes": weights, "memory_grads_bytes": grads, "memory_optimizer_bytes": optimizer,
        "memory_activations_bytes": activations, "memory_a2a_buffers_bytes": a2a, "memory_allowance_bytes": allowance,
        "memory_total_bytes": total, "fits": total <= backend.device.memory_bytes,
    }  # fmt: skip


def _activation_bytes(b: DesignBatch, counts: dict, *, elementwise: bool = False) -> np.ndarray:
    """model.activation_bytes (Korthikanti et al. 2022), summed as n_dense + n_moe like blocks.
    `elementwise`: as model.elementwise_bytes counts them (selective, whatever the spec says)."""
    s, bsz, h, a = (x.astype(np.float64) for x in (b.seq_len, b.micro_batch, b.d_model, b.n_heads))
    tokens = s * bsz
    scale = np.where(b.precision == PRECISIONS.index("fp32"), 2, 1)
    sbh = s * bsz * h
    selective = (b.recompute == RECOMPUTE.index("selective")) | elementwise
    attention = 15 * sbh + np.where(selective, 0, 5 * a * s * s * bsz)
    dense_mlp = 19 * sbh * b.d_ff / (4 * h)
    rows_per_token = counts["expert_rows"] / tokens
    moe_mlp = 19 * sbh * (rows_per_token * b.expert_d_ff + b.shared_count * b.shared_d_ff) / (4 * h)
    n_moe = b.n_moe_layers
    layers = (b.n_layers - n_moe) * (attention + dense_mlp) * scale + n_moe * (attention + moe_mlp) * scale
    full = b.n_layers * (2 * sbh * scale)
    full_recompute = (b.recompute == RECOMPUTE.index("full")) & (not elementwise)
    return np.where(full_recompute, full, layers) / (b.pp * b.tp)


@np.errstate(divide="ignore", invalid="ignore")
def _time(b: DesignBatch, backend: Backend, counts: dict, collectives: CollectiveCosts, *,
          overlap: float, imbalance: float) -> dict[str, np.ndarray]:  # fmt: skip
    """model.step_time: roofline compute, all-to-all on the critical path, the exposed share of
    the gradient all-reduce, pipeline bubble and the optimizer's memory-bound update."""
    world = b.dp * b.tp * b.pp
    # What the scalar path cannot evaluate: step_time raises on the first, the spec layer
    # refuses the second. Such designs get NaN times (errstate above keeps numpy quiet).
    valid = (world <= backend.num_devices) & (b.dp % b.ep == 0)
    peaks = np.array([backend.device.peak_flops_per_s.get(name, np.nan) for name in PRECISIONS])
    peak = peaks[b.precision]
    bpe = _bytes_per_element(b).astype(np.float64)
    micro_steps = b.global_batch // (b.micro_batch * b.dp)
    shard = b.tp * b.pp
    memory_Bps = backend.device.memory_bandwidth_Bps * backend.memory_efficiency
    dense, expert = counts["params_total"] - counts["expert_params"], counts["expert_params"]

    local_weight_bytes = (dense + expert / b.ep) / shard * bpe
    # Recomputation as model.recompute_factor / selective_recompute_flops say.
    full = np.where(b.recompute == RECOMPUTE.index("full"), 4 / 3, 1.0)
    selective = np.where(
        b.recompute == RECOMPUTE.index("selective"),
        4.0 * b.micro_batch * b.n_heads * b.seq_len.astype(np.float64) ** 2 * b.head_dim * b.n_layers,
        0.0,
    )
    flops = ((counts["step_flops"] + (imbalance - 1) * counts["dropless_expert_flops"]) * full + selective) / shard
    micro_s = np.maximum(flops / (peak * backend.matmul_efficiency), 3 * local_weight_bytes / memory_Bps)
    compute_s = micro_s * micro_steps
    # model.elementwise_bytes and overhead.fixed_overhead_s.
    elementwise_s = ELEMENTWISE_PASSES * _activation_bytes(b, counts, elementwise=True) * full / memory_Bps * micro_steps
    ov = backend.overheads
    moe_layer_s = np.array([ov.moe_layer(name) for name in ROUTER_NAMES])[b.router]
    a2a_calls = np.where(b.ep > 1, ov.a2a_call_s * A2A_CALLS_PER_LAYER, 0.0)
    fixed_s = ov.step_s + (b.n_layers - b.n_moe_layers) * ov.dense_layer_s + b.n_moe_layers * (
        moe_layer_s + ov.local_expert_s * b.experts / b.ep + a2a_calls)
    overhead_s = fixed_s / b.pp * micro_steps + ov.optimizer_step_s

    # All-to-all: 4 per MoE layer per micro-step over ranks 0..ep-1, rows*D*b/ep per pair.
    a2a_on = valid & (b.ep > 1) & (b.n_moe_layers > 0)
    rows = counts["expert_rows"] * np.where(b.dropless & ~b.balanced, imbalance, 1.0)
    a2a_s = np.zeros(len(b))
    if a2a_on.any():
        i = np.flatnonzero(a2a_on)
        per_layer = 4 * collectives.all_to_all_s(b.ep[i], rows[i] * b.d_model[i] * bpe[i] / b.ep[i])
        a2a_s[i] = b.n_moe_layers[i] * per_layer * (micro_steps[i] / b.pp[i])

    # Tensor- and pipeline-parallel activation traffic (model.step_time says what is counted).
    activations_bytes = b.micro_batch * b.seq_len * b.d_model * bpe
    tp_comm_s = np.zeros(len(b))
    pp_comm_s = np.zeros(len(b))
    tp_on = valid & (b.tp > 1)
    if tp_on.any():
        i = np.flatnonzero(tp_on)
        per_call = collectives.all_reduce_s(np.ones_like(b.tp[i]), b.tp[i], activations_bytes[i])
        tp_comm_s[i] = 4 * b.n_layers[i] / b.pp[i] * per_call * micro_steps[i]
    pp_on = valid & (b.pp > 1)
    if pp_on.any():
        i = np.flatnonzero(pp_on)
        pp_comm_s[i] = 2 * collectives.pair_exchange_s(b.tp[i], activations_bytes[i] / b.tp[i]) * micro_steps[i]

    # Gradient all-reduce: dense over the dp ranks (stride tp*pp), experts over every ep-th.
    expert_dp = b.dp // b.ep
    dense_ar = np.zeros(len(b))
    expert_ar = np.zeros(len(b))
    dense_on = valid & (b.dp > 1)
    if dense_on.any():
        i = np.flatnonzero(dense_on)
        dense_ar[i] = collectives.all_reduce_s(shard[i], b.dp[i], dense[i] / shard[i] * bpe[i]) * backend.allreduce_scale
    expert_on = dense_on & (expert_dp > 1) & (expert > 0)
    if expert_on.any():
        i = np.flatnonzero(expert_on)
        expert_ar[i] = collectives.all_reduce_s(shard[i] * b.ep[i], expert_dp[i], expert[i] / b.ep[i] / shard[i] * bpe[i]) * backend.allreduce_scale
    allreduce_s = dense_ar + expert_ar
    exposed = (1 - overlap) * dense_ar + expert_ar  # model.step_time: expert gradients after backward

    pipelined_s = compute_s + elementwise_s + overhead_s + a2a_s + tp_comm_s
    bubble_s = np.where(b.pp > 1, (b.pp - 1) / (micro_steps + b.pp - 1) * pipelined_s, 0.0)
    local_params = np.where(b.zero_stage >= 1, dense / b.dp + expert / b.ep / expert_dp, dense + expert / b.ep)
    optimizer_s = 2 * 16 * local_params / shard / memory_Bps
    step_s = compute_s + elementwise_s + overhead_s + a2a_s + tp_comm_s + pp_comm_s + exposed + bubble_s + optimizer_s
    tokens_per_s = b.global_batch * b.seq_len / step_s
    mfu = counts["model_flops_per_token"] * tokens_per_s / (world * peak)
    times = {
        "compute_s": compute_s, "elementwise_s": elementwise_s, "overhead_s": overhead_s, "a2a_s": a2a_s, "tp_comm_s": tp_comm_s, "pp_comm_s": pp_comm_s, "allreduce_s": allreduce_s, "exposed_allreduce_s": exposed,
        "bubble_s": bubble_s, "optimizer_s": optimizer_s, "step_s": step_s, "tokens_per_s": tokens_per_s, "mfu": mfu,
    }  # fmt: skip
    return {"valid": valid} | {name: np.where(valid, value, np.nan) for name, value in times.items()}
