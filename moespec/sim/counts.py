"""Exact counts of the compiled model, predicted from the plan alone (REFERENCE.md sec. 4).

Parameters equal `sum(p.numel())` of the built module; training-step FLOPs equal what
`torch.utils.flop_counter.FlopCounterMode` reports for one forward + backward of one
micro-batch on one rank (capacity padding included); all-to-all bytes equal what the
expert-parallel layer counts as sent to other ranks. Pure Python integers: no torch.

Conventions the formulas mirror (they are the compiled model's, see moespec/model):
- a Linear of `i` inputs and `o` outputs on N rows costs 2*N*i*o forward and 4*N*i*o
  backward (grad of input and of weight): 6*N*i*o per step. Every matmul input here requires
  grad (the embedding is trainable), so every backward computes both;
- attention scores and values: 4*B*H*S^2*hd forward, 8*B*H*S^2*hd backward (torch counts the
  full S x S product, causal masking does not discount it);
- experts with capacity run on the fixed [E, C, D] buffer: E*C rows, padding included;
  dropless experts run on exactly the T*k routed rows, whatever the balance.

Shape legend: B micro-batch, S sequence, T = B*S tokens, D d_model, H heads, KV kv heads,
hd head dim, F widths, E experts, k experts per token, C capacity, V vocabulary, P ep degree.
"""

from __future__ import annotations

from dataclasses import dataclass

from moespec.spec.plan import LayerPlan, ModelPlan, MoELayerPlan, SpecPlan

GATED = ("swiglu", "geglu")


def _ffn_matrices(activation: str) -> int:
    return 3 if activation in GATED else 2


def _norm_params(model: ModelPlan) -> int:
    return 2 * model.d_model if model.norm == "layernorm" else model.d_model


def _router_params(moe: MoELayerPlan, d_model: int) -> int:
    router, n_experts = moe.router, moe.experts.count
    if router.type == "hash":
        return 0
    gate = d_model * n_experts + (n_experts if getattr(router, "bias", False) else 0)
    noise = d_model * n_experts if router.type == "noisy_topk" else 0
    return gate + noise


@dataclass(frozen=True)
class ParamPrediction:
    total: int
    active: int  # per token: dense + router + k routed experts + shared, embeddings included
    embedding: int  # token embeddings (+ learned positions)
    lm_head: int


def attention_params(model: ModelPlan) -> int:
    q_width, kv_width = model.n_heads * model.head_dim, model.n_kv_heads * model.head_dim
    bias = (q_width + 2 * kv_width) if model.qkv_bias else 0
    return model.d_model * (q_width + 2 * kv_width) + q_width * model.d_model + bias


def layer_params(model: ModelPlan, layer: LayerPlan) -> tuple[int, int]:
    """(total, active per token) of one decoder block."""
    base = attention_params(model) + 2 * _norm_params(model)
    matrices = _ffn_matrices(model.activation)
    if layer.moe is None:
        dense = base + matrices * model.d_model * layer.d_ff
        return dense, dense
    moe = layer.moe
    experts = moe.experts
    routed = experts.count * matrices * model.d_model * experts.d_ff
    shared = experts.shared_count * matrices * model.d_model * experts.shared_d_ff
    shared += model.d_model if experts.shared_count and experts.shared_gate else 0
    router = _router_params(moe, model.d_model)
    total = base + router + routed + shared
    k = moe.router.experts_per_token
    return total, total - routed + routed * k // experts.count


def predict_params(plan: SpecPlan) -> ParamPrediction:
    model = plan.model
    embedding = model.vocab_size * model.d_model + (model.seq_len * model.d_model if model.positions == "learned" else 0)
    lm_head = 0 if model.tied_embeddings else model.vocab_size * model.d_model
    outer = embedding + lm_head + _norm_params(model)
    per_layer = [layer_params(model, layer) for layer in plan.layers]
    return ParamPrediction(
        total=outer + sum(total for total, _ in per_layer),
        active=outer + sum(active for _, active in per_layer),
        embedding=embedding,
        lm_head=lm_head,
    )


# --- FLOPs ---------------------------------------------------------------------------------


def expert_rows(moe: MoELayerPlan, tokens: int, *, training: bool = True) -> int:
    """Rows the routed experts compute on: E*C with capacity (padding included), T*k dropless
    (BASE: T, every token to one expert). The same CapacityPlan.capacity the runtime calls."""
    n_experts, k = moe.experts.count, moe.router.experts_per_token
    if moe.capacity is None or moe.capacity.dropless:
        return tokens * k
    return n_experts * moe.capacity.capacity(tokens, k, n_experts, training=training)


def attention_flops(model: ModelPlan, batch: int) -> int:
    t, d = batch * model.seq_len, model.d_model
    q_width, kv_width = model.n_heads * model.head_dim, model.n_kv_heads * model.head_dim
    projections = 6 * t * d * (2 * q_width + 2 * kv_width)
    scores_values = 12 * batch * model.n_heads * model.seq_len**2 * model.head_dim
    return projections + scores_values


def layer_flops_by_part(model: ModelPlan, layer: LayerPlan, batch: int) -> dict[str, int]:
    """Matmul FLOPs of one block by part, forward + backward, for `batch` sequences."""
    t, d = batch * model.seq_len, model.d_model
    matrices = _ffn_matrices(model.activation)
    parts = {"attention": attention_flops(model, batch)}
    if layer.moe is None:
        parts["dense_ffn"] = 6 * t * d * layer.d_ff * matrices
        return parts
    moe = layer.moe
    experts = moe.experts
    router_matrices = {"hash": 0, "noisy_topk": 2}.get(moe.router.type, 1)
    parts["router"] = 6 * t * d * experts.count * router_matrices
    expert_flops = 6 * expert_rows(moe, t) * d * experts.d_ff * matrices
    dropless = moe.capacity is None or moe.capacity.dropless
    parts["experts_dropless" if dropless else "experts_capacity"] = expert_flops
    if experts.shared_count:
        parts["shared_experts"] = 6 * t * d * experts.shared_count * experts.shared_d_ff * matrices
        parts["shared_experts"] += 6 * t * d if experts.shared_gate else 0
    return parts


def layer_flops(model: ModelPlan, layer: LayerPlan, batch: int) -> int:
    """Matmul FLOPs of one block, forward + backward, for one micro-batch of `batch` sequences."""
    return sum(layer_flops_by_part(model, layer, batch).values())


def step_flops_by_part(plan: SpecPlan, *, batch: int | None = None) -> dict[str, int]:
    """`predict_step_flops` split into attention, dense FFN, router, experts (capacity or
    dropless), shared experts and the LM head: the parts sum to the total exactly."""
    batch = batch or plan.parallel.micro_batch
    model = plan.model
    parts = {"lm_head": 6 * batch * model.seq_len * model.d_model * model.vocab_size}
    for layer in plan.layers:
        for name, flops in layer_flops_by_part(model, layer, batch).items():
            parts[name] = parts.get(name, 0) + flops
    return parts


def predict_step_flops(plan: SpecPlan, *, batch: int | None = None) -> int:
    """FlopCounterMode's count for one training micro-step (forward + backward) on one rank."""
    return sum(step_flops_by_part(plan, batch=batch).values())


# --- all-to-all bytes ----------------------------------------------------------------------


def predict_a2a_bytes(plan: SpecPlan, *, batch: int | None = None, bytes_per_element: int = 4) -> int:
    """Bytes one rank sends to other ranks in one micro-step: per MoE layer, dispatch and
    combine, forward and backward (4 transfers of the expert rows), each sending the rows
    owned by the other P-1 ranks. Exact with capacity (fixed buffers) and for BASE (exactly
    balanced); for other dropless routers this is the balanced value, the measured one
    depends on routing. The BASE token shuffle is not included (reported apart)."""
    ep = plan.parallel.ep
    if ep == 1:
        return 0
    batch = batch or plan.parallel.micro_batch
    tokens, d = batch * plan.model.seq_len, plan.model.d_model
    total = 0
    for layer in plan.moe_layers:
        rows = expert_rows(layer.moe, tokens)
        total += 4 * rows * d * bytes_per_element * (ep - 1) // ep
    return total
