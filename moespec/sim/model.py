"""One training step, predicted: memory per device and time (REFERENCE.md sec. 4 and 5).

Counts come from `counts.py` (exact); memory and time are models, each term a small function
with its unit in its name, every assumption stated where it is made. Scalar evaluation of one
design; `batch.py` evaluates the same formulas for many designs at once (the explorer).

Rank layout (as the runtime's DeviceMesh): an expert-parallel group is `ep` consecutive ranks,
so it stays inside a node while ep <= devices per node; the data-parallel group is every rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from moespec.sim.backend import Backend
from moespec.sim.collectives import all_reduce_time_s, all_to_all_time_s
from moespec.sim.counts import expert_rows, predict_a2a_bytes, predict_params, predict_step_flops, step_flops_by_part
from moespec.sim.overhead import ELEMENTWISE_PASSES, fixed_overhead_s
from moespec.sim.topology import build_topology
from moespec.spec.plan import SpecPlan

ALLOCATOR_ALLOWANCE = 0.10  # fragmentation and workspace: 10% on top of what is counted
DEFAULT_OVERLAP = 0.5  # share of the gradient all-reduce hidden behind the backward pass


def bytes_per_element(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class MemoryPrediction:
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    a2a_buffers_bytes: float
    allowance_bytes: float
    total_bytes: float
    device_bytes: float
    fits: bool


def _param_split(plan: SpecPlan) -> tuple[int, int]:
    """(dense, expert) parameter counts of the whole model."""
    total = predict_params(plan).total
    expert = 0
    for layer in plan.moe_layers:
        e = layer.moe.experts
        matrices = 3 if plan.model.activation in ("swiglu", "geglu") else 2
        expert += e.count * matrices * plan.model.d_model * e.d_ff
    return total - expert, expert


def memory_per_device(plan: SpecPlan, backend: Backend) -> MemoryPrediction:
    """Mixed-precision Adam is 16 bytes per parameter (bf16 weight and grad, fp32 master, m, v);
    fp32 training is 4 + 4 + 8. ZeRO shards over the group that replicates a parameter: dense
    over dp, experts over dp / ep. Pipeline stages split layers evenly; tensor parallel splits
    every matrix."""
    p = plan.parallel
    b = bytes_per_element(p.precision)
    weight_b, grad_b, optim_b = (b, b, 16 - 2 * b)
    dense, expert = _param_split(plan)
    shard = p.tp * p.pp
    dense_local, expert_local = dense / shard, expert / p.ep / shard
    zero = p.zero_stage

    def placed(count_dense: float, count_expert: float, bytes_each: int, sharded: bool) -> float:
        if not sharded:
            return (count_dense + count_expert) * bytes_each
        return (count_dense / p.dp + count_expert / p.expert_dp) * bytes_each

    weights = placed(dense_local, expert_local, weight_b, zero >= 3)
    grads = placed(dense_local, expert_local, grad_b, zero >= 2)
    optimizer = placed(dense_local, expert_local, optim_b, zero >= 1)
    activations = activation_bytes(plan)
    a2a = a2a_buffer_bytes(plan)
    counted = weights + grads + optimizer + activations + a2a
    allowance = ALLOCATOR_ALLOWANCE * counted
    total = counted + allowance
    return MemoryPrediction(
        weights, grads, optimizer, activations, a2a, allowance, total,
        float(backend.device.memory_bytes), total <= backend.device.memory_bytes,
    )  # fmt: skip


def activation_bytes(plan: SpecPlan) -> float:
    """Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per dense 16-bit layer without
    recomputation, of which 19*s*b*h is the 4h-wide MLP. For a MoE layer the MLP part scales
    with the rows experts see per token (k * cf, E*C/T) times their width over 4h. Selective
    recomputation drops the 5*a*s/h attention term; full keeps only each layer's input (2sbh).
    fp32 doubles everything. Layers on one pipeline stage: n_layers / pp."""
    m, p = plan.model, plan.parallel
    s, bsz, h, a = m.seq_len, p.micro_batch, m.d_model, m.n_heads
    tokens = s * bsz
    scale = 2 if p.precision == "fp32" else 1
    total = 0.0
    for layer in plan.layers:
        if p.recompute == "full":
            total += 2 * s * bsz * h * scale
            continue
        attention = 15 * s * bsz * h + (0 if p.recompute == "selective" else 5 * a * s * s * bsz)
        if layer.moe is None:
            mlp = 19 * s * bsz * h * layer.d_ff / (4 * h)
        else:
            e = layer.moe.experts
            rows_per_token = expert_rows(layer.moe, tokens) / tokens
            mlp = 19 * s * bsz * h * (rows_per_token * e.d_ff + e.shared_count * e.shared_d_ff) / (4 * h)
        total += (attention + mlp) * scale
    return total / (p.pp * p.tp)


def a2a_buffer_bytes(plan: SpecPlan) -> float:
    """Send and receive buffers of the largest MoE layer's dispatch."""
    if plan.parallel.ep == 1 or not plan.moe_layers:
        return 0.0
    tokens = plan.tokens_per_group
    rows = max(expert_rows(layer.moe, tokens) for layer in plan.moe_layers)
    return 2.0 * rows * plan.model.d_model * bytes_per_element(plan.parallel.precision)


@dataclass(frozen=True)
class TimePrediction:
    compute_s: float  # forward + backward matmul time of all micro-steps (roofline)
    elementwise_s: float  # memory-bound non-matmul work: 3 passes over the stored activations
    overhead_s: float  # fixed host time (dispatch, launches) from the backend's overheads
    a2a_s: float  # expert-parallel all-to-all, on the critical path
    tp_comm_s: float  # tensor-parallel activation all-reduces (Megatron: 4 per block per micro-step)
    pp_comm_s: float  # pipeline sends between neighbouring stages (activation forward, gradient back)
    dp_allreduce_s: float  # dense gradients over dp, expert gradients over dp/ep
    exposed_allreduce_s: float
    bubble_s: float
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    model_flops_per_token: float


def step_time(plan: SpecPlan, backend: Backend, *, overlap: float = DEFAULT_OVERLAP, imbalance: float = 1.0) -> TimePrediction:
    """`imbalance` (>= 1): the busiest expert-parallel rank's dropless load over the balanced
    one (max/mean, as `moespec train` prints it). Dropless experts and their all-to-all wait
    for the busiest rank, so both scale by it; capacity layers are fixed-size and do not."""
    if imbalance < 1:
        raise ValueError(f"imbalance is max/mean load, so at least 1; got {imbalance}")
    p, m = plan.parallel, plan.model
    if p.world > backend.num_devices:
        raise ValueError(f"the spec needs {p.world} devices; backend {backend.name} has {backend.num_devices}")
    graph = build_topology(backend)
    peak = backend.device.peak_flops_per_s["fp32" if p.precision == "fp32" else p.precision]
    b = bytes_per_element(p.precision)
    micro_steps = p.grad_accum
    # Roofline per micro-step: matmul FLOPs at the calibrated efficiency, or reading the local
    # weights three times (forward, backward for inputs, for weights) if that is slower.
    dense, expert = _param_split(plan)
    local_weight_bytes = (dense + expert / p.ep) / (p.tp * p.pp) * b
    by_part = step_flops_by_part(plan)
    flops = (sum(by_part.values()) + (imbalance - 1) * by_part.get("experts_dropless", 0)) * recompute_factor(p.recompute)
    flops = (flops + selective_recompute_flops(plan)) / (p.tp * p.pp)
    micro_s = max(flops / (peak * backend.matmul_efficiency),
                  3 * local_weight_bytes / (backend.device.memory_bandwidth_Bps * backend.memory_efficiency))  # fmt: skip
    compute_s = micro_s * micro_steps
    memory_Bps = backend.device.memory_bandwidth_Bps * backend.memory_efficiency
    elementwise_s = elementwise_bytes(plan) / memory_Bps * micro_steps
    overhead_s = fixed_overhead_s(plan, backend.overheads)
    # All-to-all: 4 transfers per MoE layer per micro-step, each rank sending rows*D*b/ep to
    # every other rank of its group (ranks 0..ep-1: a group is consecutive ranks).
    a2a_s = 0.0
    if p.ep > 1:
        ranks = list(range(p.ep))
        for layer in plan.moe_layers:
            rows = expert_rows(layer.moe, plan.tokens_per_group)
            dropless = layer.moe.capacity is None or layer.moe.capacity.dropless
            rows *= imbalance if dropless and layer.moe.router.type != "base" else 1  # BASE is exactly balanced
            a2a_s += 4 * all_to_all_time_s(graph, ranks, rows * m.d_model * b / p.ep)
        a2a_s *= micro_steps / p.pp
    grad_b = b
    # Tensor parallel (Megatron-style): every block all-reduces its [B, S, D] activations twice
    # in forward and twice in backward over the tp ranks (consecutive: inside a node while tp
    # fits one). Pipeline: each micro-step sends its activations to the next stage and their
    # gradient back, a pair exchange between neighbouring stages (rank r and r + tp), each tp
    # rank its 1/tp share. Neither overlaps compute here.
    activations_bytes = p.micro_batch * m.seq_len * m.d_model * b
    tp_comm_s = pp_comm_s = 0.0
    if p.tp > 1:
        tp_comm_s = 4 * m.n_layers / p.pp * all_reduce_time_s(graph, list(range(p.tp)), activations_bytes) * micro_steps
    if p.pp > 1:
        pp_comm_s = 2 * all_to_all_time_s(graph, [0, p.tp], activations_bytes / p.tp) * micro_steps
    # Dense gradients: DDP reduces them during backward (`overlap` of it hidden). Expert
    # gradients: the runtime reduces them over their expert-data-parallel group after backward
    # (data_parallel.reduce_expert_gradients), so all of that is exposed.
    dense_allreduce_s = expert_allreduce_s = 0.0
    if p.dp > 1:
        dp_ranks = list(range(0, p.world, p.tp * p.pp))[: p.dp]
        dense_allreduce_s = all_reduce_time_s(graph, dp_ranks, dense / (p.tp * p.pp) * grad_b) * backend.allreduce_scale
        if p.expert_dp > 1 and expert:
            edp_ranks = dp_ranks[:: p.ep][: p.expert_dp]
            expert_allreduce_s = all_reduce_time_s(graph, edp_ranks, expert / p.ep / (p.tp * p.pp) * grad_b) * backend.allreduce_scale
    allreduce_s = dense_allreduce_s + expert_allreduce_s
    exposed = (1 - overlap) * dense_allreduce_s + expert_allreduce_s
    pipelined_s = compute_s + elementwise_s + overhead_s + a2a_s + tp_comm_s
    bubble_s = (p.pp - 1) / (micro_steps + p.pp - 1) * pipelined_s if p.pp > 1 else 0.0
    local_params = (dense / p.dp + expert / p.ep / p.expert_dp) if p.zero_stage >= 1 else dense + expert / p.ep
    optimizer_s = 2 * 16 * local_params / (p.tp * p.pp) / (backend.device.memory_bandwidth_Bps * backend.memory_efficiency)
    step_s = compute_s + elementwise_s + overhead_s + a2a_s + tp_comm_s + pp_comm_s + exposed + bubble_s + optimizer_s
    tokens = p.global_batch * m.seq_len
    model_flops_per_token = model_flops_per_token_of(plan)
    tokens_per_s = tokens / step_s
    mfu = model_flops_per_token * tokens_per_s / (p.world * peak)
    return TimePrediction(compute_s, elementwise_s, overhead_s, a2a_s, tp_comm_s, pp_comm_s, allreduce_s, exposed, bubble_s, optimizer_s, step_s, tokens_per_s, mfu, model_flops_per_token)


def elementwise_bytes(plan: SpecPlan) -> float:
    """Bytes one micro-step's non-matmul ops move on one rank (sim/overhead.py says why 3
    passes over the stored activations). The attention scores (Korthikanti's 5*a*s/h term)
    are left out: fused attention (SDPA's flash kernels, on GPU and CPU) never writes them
    to memory. Full recomputation replays the forward (4/3)."""
    as_fused = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, recompute="selective"))
    return ELEMENTWISE_PASSES * activation_bytes(as_fused) * recompute_factor(plan.parallel.recompute)


def recompute_factor(recompute: str) -> float:
    """Full recomputation runs every forward matmul twice: the forward is 2 of the 6 FLOPs per
    weight (and 4 of the 12 of attention), so the step does 4/3 of the counted work."""
    return 4 / 3 if recompute == "full" else 1.0


def selective_recompute_flops(plan: SpecPlan) -> float:
    """Selective recomputation (Korthikanti et al.) redoes only attention's scores and values
    forward: 4 * B * H * S^2 * hd per layer."""
    if plan.parallel.recompute != "selective":
        return 0.0
    m = plan.model
    return 4.0 * plan.parallel.micro_batch * m.n_heads * m.seq_len**2 * m.head_dim * m.n_layers


def model_flops_per_token_of(plan: SpecPlan) -> float:
    """For MFU: 6 per active matmul parameter (the token embedding is a lookup, not a matmul;
    a tied table still does the LM head's matmul) plus attention, 12 * L * H * hd * S."""
    m = plan.model
    params = predict_params(plan)
    active_matmul = params.active - params.embedding + (params.embedding if m.tied_embeddings else 0)
    return 6 * active_matmul + 12 * m.n_layers * m.n_heads * m.head_dim * m.seq_len


def simulate(plan: SpecPlan, backend: Backend, *, overlap: float = DEFAULT_OVERLAP, imbalance: float = 1.0) -> dict:
    """Everything `moespec simulate` reports, as plain data."""
    params = predict_params(plan)
    memory = memory_per_device(plan, backend)
    timing = step_time(plan, backend, overlap=overlap, imbalance=imbalance)
    by_part = step_flops_by_part(plan)
    total_flops = sum(by_part.values())
    # Compute time split in proportion to FLOPs (one roofline rate for every matmul).
    compute_by_part_s = {name: timing.compute_s * flops / total_flops for name, flops in by_part.items()}
    return {
        "spec": plan.name,
        "backend": backend.name,
        "world": plan.parallel.world,
        "dp": plan.parallel.dp,
        "ep": plan.parallel.ep,
        "global_batch": plan.parallel.global_batch,
        "params": {"total": params.total, "active": params.active, "embedding": params.embedding,
                   "embeddings_in_active": True},  # fmt: skip
        "step_flops_per_rank_microstep": predict_step_flops(plan),
        "step_flops_by_part": by_part,
        "compute_s_by_part": compute_by_part_s,
        "a2a_bytes_per_rank_microstep": predict_a2a_bytes(plan, bytes_per_element=bytes_per_element(plan.parallel.precision)),
        "memory_per_device": asdict(memory),
        "time": asdict(timing),
        "assumptions": {
            "allocator_allowance": ALLOCATOR_ALLOWANCE,
            "allreduce_overlap": overlap,
            "dropless_imbalance": imbalance,
            "efficiencies": {"matmul": backend.matmul_efficiency, "memory": backend.memory_efficiency},
            "overheads": backend.overheads.as_dict(),
            "calibration": backend.calibration,
        },
    }
