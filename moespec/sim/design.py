"""Designs as arrays: what the one cost model (counts.py, cost.py) evaluates.

A `DesignBatch` holds one numpy array per spec field, one entry per design: `simulate` packs
one plan (a batch of one), the explorer packs millions by writing swept values into columns.
No SpecPlan per design, so a sweep costs array arithmetic only.

Layers: the cost model works on a `LayerTable`, one row per group of identical blocks of a
design (`design` says whose, `count` how many). A batch whose MoE layers are all alike (every
sweep) keeps them in flat per-design columns (`experts`, `k`, ... and one dense width `d_ff`):
`layer_table()` is then one MoE group per design, and its dense blocks (`dense_blocks`) are
costed per design from `d_ff`, so a sweep pays no gather and no masking. A plan that mixes
routers or widths per layer (tiny-mixed: switch, top-2, BASE) is packed with an explicit
table of dense and MoE groups; its flat MoE columns then show its first MoE layer, for
display only, and swapping them (`replace`) is refused.

Shape legend: N designs, M layer groups; every DesignBatch column is (N,), every LayerTable
column is (M,) (explicit groups, or one MoE group per design in a uniform batch).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from moespec.spec.plan import ROUTER_TYPES, LayerPlan, SpecPlan
from moespec.spec.stages import PP_SCHEDULES

PRECISIONS = ("fp32", "bf16", "fp16")  # DesignBatch.precision codes
RECOMPUTE = ("none", "selective", "full")  # DesignBatch.recompute codes
QK_NORMS = ("none", "full", "per_head", "l2")  # DesignBatch.qk_norm codes (l2: weightless, Llama-4)
ROUTER_NAMES = tuple(ROUTER_TYPES)  # DesignBatch.router / LayerTable.router codes

_BOOL_FIELDS = ("headless", "lstm", "relu", "gated", "clamped", "expert_bias", "gate_input", "selection_bias", "layernorm", "learned_positions", "tied", "qkv_bias", "out_bias", "norm_bias", "lm_head_bias", "mla", "sinks",
                "shared_gate", "router_bias",
                "dropless", "balanced", "shuffle", "moe")  # fmt: skip
_FLOAT_FIELDS = ("capacity_factor", "dropout")
# Per-layer fields: the flat MoE columns of a DesignBatch and the columns of a LayerTable.
LAYER_FIELDS = ("d_ff", "experts", "expert_d_ff", "expert_bias", "gate_input", "selection_bias", "k", "shared_count", "shared_d_ff", "shared_gate", "router",
                "router_matrices", "router_bias", "capacity_factor", "min_capacity", "dropless", "balanced",
                "shuffle", "sinkhorn_iterations")  # fmt: skip
_MOE_PLACEHOLDER = {"experts": 1, "expert_d_ff": 0, "expert_bias": False, "gate_input": False, "selection_bias": False, "k": 1, "shared_count": 0, "shared_d_ff": 0, "shared_gate": False,
                    "router": 0, "router_matrices": 0, "router_bias": False, "capacity_factor": 0.0, "min_capacity": 0,
                    "dropless": True, "balanced": False, "shuffle": False, "sinkhorn_iterations": 0}  # fmt: skip


def where_any(mask: np.ndarray, value, otherwise):
    """np.where for the masks only the newer hosts set (an LSTM host, an encoder-decoder's
    parts): a batch where none is set (every sweep) pays no pass over its designs. `value`
    may be a callable, then it is only computed when needed."""
    if not mask.any():
        return otherwise
    return np.where(mask, value() if callable(value) else value, otherwise)


def weighted_qk_norm(b) -> np.ndarray:
    """Designs whose QK-norm has weights (full or per head; Llama-4's l2 has none)."""
    return (b.qk_norm == QK_NORMS.index("full")) | (b.qk_norm == QK_NORMS.index("per_head"))


def _column(name: str, values) -> np.ndarray:
    dtype = bool if name in _BOOL_FIELDS else np.float64 if name in _FLOAT_FIELDS else np.int64
    return np.array(values, dtype=dtype)  # a copy: a batch never aliases the caller's arrays


@dataclass(frozen=True)
class LayerTable:
    """Groups of identical blocks. Placeholders make every term of the other kind vanish:
    a dense group has experts 1, expert_d_ff 0, no shared experts, no router; a MoE group
    has d_ff 0 (design.py's _MOE_PLACEHOLDER and _layer_row)."""

    design: np.ndarray  # index of the design this group belongs to
    count: np.ndarray  # blocks in the group (0 allowed: contributes nothing)
    moe: np.ndarray  # MoE blocks, else dense
    d_ff: np.ndarray  # dense FFN width (dense groups)
    experts: np.ndarray  # E routed experts
    expert_d_ff: np.ndarray
    expert_bias: np.ndarray  # a bias per routed expert on each projection (gpt-oss)
    gate_input: np.ndarray  # the gate scales the expert's input (Llama-4, top-1)
    selection_bias: np.ndarray  # ERNIE-4.5's frozen per-expert score correction (E parameters, no gradient)
    k: np.ndarray  # experts per token (router.experts_per_token)
    shared_count: np.ndarray
    shared_d_ff: np.ndarray
    shared_gate: np.ndarray
    router: np.ndarray  # index into ROUTER_NAMES
    router_matrices: np.ndarray  # D x E router matrices: 0 hash, 2 noisy_topk, 1 the others
    router_bias: np.ndarray  # an E-vector bias on the gate
    capacity_factor: np.ndarray  # training factor; 0 where dropless
    min_capacity: np.ndarray
    dropless: np.ndarray  # no capacity (BASE), dropless, or no factor: T*k expert rows
    balanced: np.ndarray  # BASE: exactly balanced, so `imbalance` does not apply
    shuffle: np.ndarray  # BASE token shuffle over the EP group in training
    sinkhorn_iterations: np.ndarray  # Sinkhorn router's balancing iterations (0 otherwise)
    uniform: bool = False  # one MoE group per design, row n for design n; dense blocks are per design

    def lift(self, values: np.ndarray) -> np.ndarray:
        """A per-design array [N] seen per group [M]: as is in a uniform table, gathered by
        `design` in an explicit one."""
        return values if self.uniform else values[self.design]

    def per_design(self, values: np.ndarray, n: int) -> np.ndarray:
        """Sum a per-group figure (already times count) into its designs. -> [N]"""
        if self.uniform:
            return np.broadcast_to(values, (n,))
        out = np.zeros(n, dtype=np.result_type(values))
        np.add.at(out, self.design, values)
        return out

    def max_per_design(self, values: np.ndarray, n: int) -> np.ndarray:
        """Largest per-group figure of each design (0 where none). -> [N]"""
        if self.uniform:
            return np.broadcast_to(values, (n,))
        out = np.zeros(n, dtype=np.result_type(values))
        np.maximum.at(out, self.design, values)
        return out


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
    gated: np.ndarray  # swiglu / geglu / swiglu_clamped: 3 FFN matrices, else 2
    clamped: np.ndarray  # swiglu_clamped (gpt-oss): more elementwise ops and saved tensors
    relu: np.ndarray  # relu FFNs keep one hidden-wide tensor (relu's output), gelu two
    layernorm: np.ndarray  # 2*D parameters per norm, else (rmsnorm) D
    learned_positions: np.ndarray
    tied: np.ndarray
    qkv_bias: np.ndarray
    out_bias: np.ndarray  # bias on o_proj
    qk_norm: np.ndarray  # index into QK_NORMS
    norm_bias: np.ndarray  # LayerNorm with a bias (False for RMSNorm)
    lm_head_bias: np.ndarray
    mla: np.ndarray  # Multi-head Latent Attention: the four widths below apply
    q_lora_rank: np.ndarray  # 0: one q_proj (or standard attention)
    kv_lora_rank: np.ndarray
    qk_rope_dim: np.ndarray  # rotary channels per head (MLA; 0 otherwise)
    v_head_dim: np.ndarray  # value width per head (head_dim for standard attention)
    rope_dim: np.ndarray  # channels per head RoPE rotates (0 with learned positions)
    nope_layers: np.ndarray  # layers without RoPE (Llama-4), of n_layers
    sinks: np.ndarray  # attention sinks: a learned logit per head and layer
    window_layers: np.ndarray  # layers whose sliding window is shorter than seq_len (masked attention)
    seq_len: np.ndarray
    dropout: np.ndarray  # residual, embedding and attention-probability dropout
    n_moe_layers: np.ndarray  # MoE blocks; the other n_layers - n_moe_layers are dense
    above_top_moe: np.ndarray  # dense blocks after the last MoE block: their backward runs (and frees) first
    moe_span: np.ndarray  # blocks from the first MoE block up to the last (0 with one): freed before the first's backward
    experts: np.ndarray
    expert_d_ff: np.ndarray
    expert_bias: np.ndarray
    gate_input: np.ndarray
    selection_bias: np.ndarray
    k: np.ndarray
    shared_count: np.ndarray
    shared_d_ff: np.ndarray
    shared_gate: np.ndarray
    router: np.ndarray
    router_matrices: np.ndarray
    router_bias: np.ndarray
    capacity_factor: np.ndarray
    min_capacity: np.ndarray
    dropless: np.ndarray
    balanced: np.ndarray
    shuffle: np.ndarray
    sinkhorn_iterations: np.ndarray
    dp: np.ndarray
    ep: np.ndarray
    tp: np.ndarray
    pp: np.ndarray
    micro_batch: np.ndarray
    global_batch: np.ndarray
    precision: np.ndarray  # index into PRECISIONS
    zero_stage: np.ndarray
    recompute: np.ndarray  # index into RECOMPUTE
    pp_schedule: np.ndarray  # index into spec.stages.PP_SCHEDULES
    sequence_parallel: np.ndarray  # tp ranks keep S/tp of the residual stream (only with tp > 1)
    cross_len: np.ndarray  # encoder tokens per sequence each block cross-attends to (0: decoder-only)
    rel_buckets: np.ndarray  # T5's relative-bias rows (0: none); the attention then takes SDPA's math path
    headless: np.ndarray  # an encoder stack's part: no embedding, LM head or loss of its own
    lstm: np.ndarray  # Shazeer et al. 2017's host: LSTM layers of d_model units instead of attention; no norms
    layers: LayerTable | None = None  # explicit groups (plans with unlike layers); else derived
    encoder: DesignBatch | None = None  # an encoder-decoder's encoder stack, costed as a headless part

    def __post_init__(self) -> None:
        lengths = {f.name: np.shape(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in ("layers", "encoder")}  # fmt: skip
        if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
            raise ValueError(f"every DesignBatch field is one (N,) array; got shapes {lengths}")

    def __len__(self) -> int:
        return len(self.vocab)

    @functools.cached_property
    def table(self) -> LayerTable:
        """`layer_table()`, built once per batch (every cost term reads it)."""
        return self.layer_table()

    @functools.cached_property
    def expert_rows(self) -> np.ndarray:
        """counts.capacity_rows of `table`, computed once per batch (four cost terms read it)."""
        from moespec.sim.counts import capacity_rows

        return capacity_rows(self, self.table)

    def layer_table(self) -> LayerTable:
        """The groups the cost model sums over: explicit, or (uniform) one MoE group per
        design taken from the flat columns, its dense blocks left to `dense_blocks`."""
        if self.layers is not None:
            return self.layers
        moe = {name: getattr(self, name) for name in LAYER_FIELDS}
        moe["d_ff"] = np.zeros(len(self), dtype=np.int64)  # a MoE block has no dense FFN
        return LayerTable(design=np.arange(len(self)), count=self.n_moe_layers, moe=self.n_moe_layers >= 0, uniform=True, **moe)

    @property
    def dense_blocks(self) -> np.ndarray:
        """Dense blocks costed per design (width `d_ff`): all of them in a uniform batch,
        none when an explicit LayerTable lists them as groups."""
        return self.n_layers - self.n_moe_layers if self.layers is None else np.zeros(len(self), dtype=np.int64)

    def take(self, index) -> DesignBatch:
        """The designs at `index` (integer array, slice or boolean mask), as a new batch."""
        picked = {f.name: np.atleast_1d(getattr(self, f.name)[index]) for f in dataclasses.fields(self) if f.name not in ("layers", "encoder")}
        layers = None
        if self.layers is not None:
            chosen = np.arange(len(self))[index]
            chosen = np.atleast_1d(chosen)
            rows = np.concatenate([np.flatnonzero(self.layers.design == d) for d in chosen])
            renumber = np.repeat(np.arange(len(chosen)), [np.count_nonzero(self.layers.design == d) for d in chosen])
            fields = {f.name: getattr(self.layers, f.name)[rows] for f in dataclasses.fields(LayerTable) if f.name != "uniform"}
            layers = LayerTable(**(fields | {"design": renumber}))
        return DesignBatch(**picked, layers=layers, encoder=None if self.encoder is None else self.encoder.take(index))

    def replace(self, **arrays) -> DesignBatch:
        """A batch with some fields swapped; scalars broadcast to N, arrays must be (N,)."""
        if self.layers is not None and set(arrays) & set(LAYER_FIELDS + ("n_moe_layers", "n_layers")):
            raise ValueError("this batch has unlike layers (an explicit LayerTable): its layer fields cannot be swapped")
        if self.encoder is not None:
            raise ValueError("an encoder-decoder batch cannot be swept (its encoder stack is a second part); simulate its designs one by one")
        n = len(self)
        cast = {name: _column(name, np.broadcast_to(value, (n,))) for name, value in arrays.items()}
        return dataclasses.replace(self, **cast)

    @classmethod
    def from_plans(cls, plans) -> DesignBatch:
        """Pack resolved plans (any layer mix: unlike layers get an explicit LayerTable)."""
        plans = list(plans)
        if not plans:
            raise ValueError("from_plans needs at least one plan")
        with_encoder = {plan.model.encoder is not None for plan in plans}
        if len(with_encoder) > 1:
            raise ValueError("a batch holds encoder-decoder plans or decoder-only plans, not both")
        if with_encoder == {True}:  # the decoder stack with its head, and the encoder stack as a headless part
            decoder = cls._pack(plans, [plan.decoder_layers for plan in plans], headless=False)
            encoder = cls._pack(plans, [plan.encoder_layers for plan in plans], headless=True)
            return dataclasses.replace(decoder, encoder=encoder)
        return cls._pack(plans, [plan.layers for plan in plans], headless=False)

    @classmethod
    def _pack(cls, plans, stacks, *, headless: bool) -> DesignBatch:
        """One part per plan: the blocks of `stacks[i]` (all of a decoder-only plan's)."""
        rows = [_row(plan, stack, headless=headless) for plan, stack in zip(plans, stacks)]
        batch = cls(**{name: _column(name, [row[name] for row in rows]) for name in rows[0]})
        if all(_uniform(stack) for stack in stacks):
            return batch
        groups = [(i, _layer_row(plan, layer), n) for i, (plan, stack) in enumerate(zip(plans, stacks)) for layer, n in _groups(stack)]
        table = {name: _column(name, [g[1][name] for g in groups]) for name in LAYER_FIELDS + ("moe",)}
        table |= {"design": np.array([g[0] for g in groups], dtype=np.int64), "count": np.array([g[2] for g in groups], dtype=np.int64)}
        return dataclasses.replace(batch, layers=LayerTable(**table))

    @classmethod
    def sweep(cls, plan: SpecPlan, **arrays) -> DesignBatch:
        """`plan` repeated, with the given fields varied: `sweep(plan, experts=E_N, ep=ep_N)`."""
        n = max((np.size(value) for value in arrays.values()), default=1)
        return cls.from_plans([plan]).take(np.zeros(n, dtype=np.int64)).replace(**arrays)


def _unlike_layers(layers, name: str = "") -> str:
    """Why flat per-design columns cannot describe these layers ('' when they can)."""
    moe_layers = [layer for layer in layers if layer.moe is not None]
    moe_configs = {layer.moe for layer in moe_layers}
    if len(moe_configs) > 1:
        indices = [layer.index for layer in moe_layers]
        return f"{name}: layers {indices} hold {len(moe_configs)} different MoE configurations; a sweep needs every MoE layer alike"
    widths = sorted({layer.d_ff for layer in layers if layer.moe is None})
    return f"{name}: dense layers have widths {widths}; a sweep needs one" if len(widths) > 1 else ""


def parts(b: DesignBatch) -> list[DesignBatch]:
    """The parts costed per micro-step: a decoder-only design's one, an encoder-decoder's
    decoder (with the head) and its headless encoder stack (design.py)."""
    return [b] if b.encoder is None else [b, b.encoder]


def require_uniform(plan: SpecPlan) -> None:
    """ValueError unless every MoE layer is alike and every dense layer has one width: what a
    sweep's fast axes (one value per design for `experts`, `k`, ...) can describe; and the
    model is decoder-only (an encoder stack is a second part a sweep does not vary)."""
    if plan.model.encoder is not None:
        raise ValueError(f"{plan.name}: explore sweeps decoder-only specs; simulate an encoder-decoder spec one design at a time")
    if reason := _unlike_layers(plan.layers, plan.name):
        raise ValueError(reason)


def _uniform(layers) -> bool:
    return not _unlike_layers(layers)


def _groups(layers) -> list[tuple[LayerPlan, int]]:
    """Identical blocks once each, with how many there are (first-seen order)."""
    seen: dict[tuple, list] = {}
    for layer in layers:
        key = (layer.moe, None if layer.moe is not None else layer.d_ff)
        seen.setdefault(key, [layer, 0])[1] += 1
    return [(layer, n) for layer, n in seen.values()]


def _layer_row(plan: SpecPlan, layer: LayerPlan) -> dict:
    """One block's per-layer fields (a dense block: MoE placeholders, multiplied by nothing)."""
    if layer.moe is None:
        return _MOE_PLACEHOLDER | {"d_ff": layer.d_ff, "moe": False}
    router, experts, capacity = layer.moe.router, layer.moe.experts, layer.moe.capacity
    matrices = {"hash": 0, "noisy_topk": 2}.get(router.type, 1)
    dropless = capacity is None or capacity.dropless or capacity.factor is None
    return {
        "d_ff": 0, "moe": True, "router": ROUTER_NAMES.index(router.type), "experts": experts.count,
        "expert_d_ff": experts.d_ff, "expert_bias": experts.bias, "gate_input": experts.gate_input,
        "selection_bias": bool(getattr(router, "selection_bias", False)), "k": router.experts_per_token, "shared_count": experts.shared_count,
        "shared_d_ff": experts.shared_d_ff, "shared_gate": experts.shared_gate, "router_matrices": matrices,
        "router_bias": matrices > 0 and bool(getattr(router, "bias", False)),
        "capacity_factor": 0.0 if dropless else capacity.factor, "min_capacity": 0 if capacity is None else capacity.min_capacity,
        "dropless": dropless, "balanced": router.type == "base",
        "shuffle": router.type == "base" and bool(getattr(router, "shuffle", False)),
        "sinkhorn_iterations": getattr(router, "iterations", 0) if router.type == "sinkhorn" else 0,
    }  # fmt: skip


def _row(plan: SpecPlan, layers, *, headless: bool) -> dict:
    """One design's columns for one part: `layers` (a stack's blocks), headless for an encoder."""
    m, p = plan.model, plan.parallel
    dense = [layer for layer in layers if layer.moe is None]
    moe_layers = [layer for layer in layers if layer.moe is not None]
    first = _layer_row(plan, moe_layers[0]) if moe_layers else dict(_MOE_PLACEHOLDER)
    first["d_ff"] = dense[0].d_ff if dense else m.d_ff
    first.pop("moe", None)
    return first | {
        "vocab": m.vocab_size, "d_model": m.d_model, "n_layers": len(layers), "n_heads": m.n_heads,
        "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim, "gated": m.activation in ("swiglu", "geglu", "swiglu_clamped"), "clamped": m.activation == "swiglu_clamped", "relu": m.activation == "relu",
        "layernorm": m.norm == "layernorm", "learned_positions": m.positions == "learned", "tied": m.tied_embeddings,
        "qkv_bias": m.qkv_bias, "out_bias": m.out_bias, "qk_norm": QK_NORMS.index(m.qk_norm),
        "norm_bias": m.norm == "layernorm" and m.norm_bias, "lm_head_bias": m.lm_head_bias, "mla": m.mla is not None,
        "q_lora_rank": (m.mla.q_lora_rank or 0) if m.mla else 0, "kv_lora_rank": m.mla.kv_lora_rank if m.mla else 0,
        "qk_rope_dim": m.mla.qk_rope_head_dim if m.mla else 0, "v_head_dim": m.mla.v_head_dim if m.mla else m.head_dim,
        "rope_dim": m.rope_dim if m.positions == "rope" else 0, "sinks": m.attention_sinks, "nope_layers": len(m.nope_layers),
        "window_layers": sum(m.window_of(i) is not None for i in range(m.n_layers)), "dropout": m.dropout, "n_moe_layers": len(moe_layers),
        "above_top_moe": len(layers) - 1 - max(i for i, layer in enumerate(layers) if layer.moe is not None) if moe_layers else 0,
        "moe_span": moe_layers[-1].index - moe_layers[0].index if moe_layers else 0,
        "seq_len": m.encoder.seq_len if headless else m.seq_len, "cross_len": m.encoder.seq_len if m.encoder and not headless else 0,
        "rel_buckets": m.relative_buckets if m.positions == "relative" else 0, "headless": headless, "lstm": m.host == "lstm",
        "dp": p.dp, "ep": p.ep, "tp": p.tp, "pp": p.pp, "micro_batch": p.micro_batch, "global_batch": p.global_batch,
        "precision": PRECISIONS.index(p.precision), "zero_stage": p.zero_stage, "recompute": RECOMPUTE.index(p.recompute),
        "pp_schedule": PP_SCHEDULES.index(p.pp_schedule), "sequence_parallel": p.sequence_parallel,
    }  # fmt: skip
