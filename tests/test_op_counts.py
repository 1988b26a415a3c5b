"""The cost model's op list (sim/ops.py) against the ops the real model dispatches
(profiling/optrace.py, a TorchDispatchMode over one training step): parameter tensors and
optimizer ops exactly, matmuls exactly, other ops within 5% (the op database times each
family by its count, so a count that drifts from the model is a time that drifts)."""

from __future__ import annotations

import pytest

from moespec.profiling.optrace import trace_step_ops
from moespec.sim import ops, tensors
from moespec.sim.design import DesignBatch
from moespec.spec import plan_from_text

SPEC = """
version: 1
name: ops-{name}
model: {{vocab_size: 64, d_model: 16, n_layers: {layers}, n_heads: 2, d_ff: 32, seq_len: 16 {model}}}
{moe}
parallelism: {{micro_batch: 2 {parallel}}}
"""
MOE = "moe: {{placement: {{type: {placement}}}, experts: {{count: {e}, d_ff: {f} {experts}}}, router: {router}, capacity: {capacity}}}"
CASES = {
    "dense": dict(layers=2),
    "dense-gelu-layernorm": dict(layers=2, model=", activation: gelu, norm: layernorm"),
    "dense-bias-learned": dict(layers=3, model=", qkv_bias: true, positions: learned, tied_embeddings: true"),
    "dense-bf16-accum": dict(layers=2, parallel=", precision: bf16, global_batch: 4"),
    "sinks-window-bf16": dict(layers=2, model=", attention_sinks: true, sliding_window: {size: 4, layers: [1]}", parallel=", precision: bf16"),
    "window-gqa": dict(layers=3, model=", n_kv_heads: 1, sliding_window: {size: 5, layers: [0, 2]}"),
    "llama4-bf16": dict(layers=4, model=", qk_norm: l2, nope_layers: [3]", parallel=", precision: bf16",
                        moe=dict(router="{type: sigmoid_bias, k: 1, normalize: false}", capacity="{dropless: true}",
                                 experts=", shared_count: 1, shared_d_ff: 16, gate_input: true", placement="every, every: 2, offset: 1")),
    "ernie-selection-bias": dict(layers=3, moe=dict(router="{type: topk, k: 2, selection_bias: true}", capacity="{dropless: true}",
                                                 experts=", shared_count: 2, shared_d_ff: 16", placement="all, first_dense: 1")),
    "partial-rope-bf16": dict(layers=2, model=", rope_fraction: 0.5", parallel=", precision: bf16"),
    "qk-norm-biases": dict(layers=2, model=", qk_norm: full, out_bias: true, lm_head_bias: true"),
    "qk-per-head-bf16": dict(layers=2, model=", qk_norm: per_head", parallel=", precision: bf16"),
    "layernorm-no-bias": dict(layers=2, model=", norm: layernorm, norm_bias: false, lm_head_bias: true, tied_embeddings: true"),
    "topk-capacity": dict(layers=2, moe=dict(router="{type: topk, k: 2}")),
    "switch-dropless": dict(layers=2, moe=dict(router="{type: switch}", capacity="{dropless: true}")),
    "topk-dropless-shared": dict(layers=2, moe=dict(router="{type: topk, k: 2}", capacity="{dropless: true}",
                                                    experts=", shared_count: 1, shared_d_ff: 16", e=8)),
    "sinkhorn-every": dict(layers=4, moe=dict(router="{type: sinkhorn}", placement="every, every: 2, offset: 1")),
    "expert-choice": dict(layers=2, moe=dict(router="{type: expert_choice}")),
    "hash-gelu": dict(layers=2, model=", activation: gelu", moe=dict(router="{type: hash}")),
    "sigmoid-bias": dict(layers=2, moe=dict(router="{type: sigmoid_bias, k: 2}", capacity="{dropless: true}")),
    # 18 * 4 bytes is not a multiple of 16: torch._grouped_mm cannot run, the kernel loops over experts
    "dropless-loop-gelu": dict(layers=2, model=", activation: gelu", moe=dict(router="{type: topk, k: 2}", capacity="{dropless: true}",
                                                                           f=18, e=8)),
    "mla": dict(layers=2, model=", mla: {q_lora_rank: 8, kv_lora_rank: 12, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8}",
                moe=dict(router="{type: sigmoid_bias, k: 2}", capacity="{dropless: true}")),
    "mla-no-bottleneck-bf16": dict(layers=2, model=", mla: {kv_lora_rank: 12, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 12}",
                                   parallel=", precision: bf16"),
    "noisy-topk-bf16": dict(layers=2, moe=dict(router="{type: noisy_topk, k: 2}"), parallel=", precision: bf16"),
}


def _plan(name: str, case: dict):
    moe = ""
    if "moe" in case:
        m = {"placement": "all", "e": 4, "f": 16, "experts": "", "capacity": "{factor: 2.0}"} | case["moe"]
        moe = MOE.format(**m)
    text = SPEC.format(name=name, layers=case["layers"], model=case.get("model", ""), moe=moe, parallel=case.get("parallel", ""))
    return plan_from_text(text, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_list_matches_the_dispatched_ops(name):
    from moespec.model.build import build_model

    plan = _plan(name, CASES[name])
    traced = trace_step_ops(plan)
    batch = DesignBatch.from_plans([plan])
    n_tensors = int(tensors.param_tensors(batch)[0])
    assert n_tensors == len(list(build_model(plan).parameters()))
    assert traced["optimizer"] == ops.OPTIMIZER_OPS + ops.OPTIMIZER_OPS_PER_TENSOR * int(tensors.trained_tensors(batch)[0])
    host, group = (float(v[0]) * plan.parallel.grad_accum for v in ops.other_ops(batch))
    _, kernel_mm = ops.dropless_kernel_ops(batch, batch.table)  # the kernel's matmuls are booked with its ops
    group_mm = float(batch.table.per_design(batch.table.count * kernel_mm, 1)[0]) * plan.parallel.grad_accum
    assert abs(host + group - group_mm - traced["other"]) <= 0.05 * traced["other"], (host, group, traced)
