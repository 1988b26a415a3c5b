"""Per pipeline rank, exactly: what the rank that holds the most keeps and computes when
pp > 1 (`simulate` of one plan; `explore` keeps the average stage, 1/pp of the model).

Each block's figures come from the one cost model (sim/counts.py) by difference: the plan's
figures are the model's outer part (embeddings, final norm, head) plus every block's, so a
one-block plan of block i gives outer + block_i, and the n one-block plans together with the
whole plan give outer = (sum of them - whole) / (n - 1). A stage is then its blocks, plus the
embeddings on the first and the final norm and head on the last (with a tied head the last
stage holds its own copy of the table, distributed/pipeline.py). The split is the runtime's
(spec/stages.py) on the blocks' active parameters per token.

Time, the same way (`pipeline_time`): one micro-batch's forward and backward per block from
one-block plans, the head and loss (the outer part) on the last stage. Stages that differ
(the head on the last) make the pipeline wait for the slowest rank: with m micro-batches, v
stages per rank and r_i a rank's seconds per micro-batch, the pipelined part takes
m * max(r) + (sum(r) - max(r)) / v (equal ranks: (v m + pp - 1) / v * r, the textbook bubble).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moespec.sim.counts import TP_COLLECTIVES, _chunk, exact_counts, frozen_sharded_elements, sharded_elements
from moespec.sim.design import DesignBatch
from moespec.spec.plan import SpecPlan
from moespec.spec.stages import rank_stages, stage_bounds, stages_per_rank

# additive figures split by block: name in exact_counts (or "sharded" for ZeRO's row chunks)
_TP = tuple(f"tp_{kind}_{unit}" for kind in TP_COLLECTIVES for unit in ("calls", "bytes"))
_FIGURES = ("params_total", "params_active", "expert_params", "tp_saved_params", "tp_saved_flops", "step_flops", "flops_lm_head",
            *_TP, "frozen_params", "zero_all_gather_calls", "sharded", "frozen_sharded")  # fmt: skip


def _one_block(plan: SpecPlan, i: int) -> SpecPlan:
    layer = plan.layers[i]
    model = dataclasses.replace(
        plan.model, n_layers=1,
        window_layers=(0,) if i in plan.model.window_layers else (),
        nope_layers=(0,) if i in plan.model.nope_layers else (),
    )  # fmt: skip
    parallel = dataclasses.replace(plan.parallel, pp=1, pp_layers=None)
    return dataclasses.replace(plan, model=model, layers=(dataclasses.replace(layer, index=0),), parallel=parallel)


def _figures(plans: list[SpecPlan]) -> dict[str, np.ndarray]:
    batch = DesignBatch.from_plans(plans)
    figures = exact_counts(batch)
    out = {name: np.asarray(figures[name], dtype=object) for name in _FIGURES if not name.endswith("sharded")}
    out["sharded"] = np.asarray(sharded_elements(batch), dtype=np.float64)  # ZeRO's row chunks over dp (experts over dp/ep)
    out["frozen_sharded"] = np.asarray(frozen_sharded_elements(batch), dtype=np.float64)
    return out


def block_figures(plan: SpecPlan) -> tuple[list[dict], dict]:
    """(per block: its share of each figure, the outer part's), by difference (module docstring)."""
    n = len(plan.layers)
    whole = _figures([dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, pp=1, pp_layers=None))])
    singles = _figures([_one_block(plan, i) for i in range(n)])
    outer = {name: (singles[name].sum() - whole[name][0]) / (n - 1) if n > 1 else 0 for name in _FIGURES}
    if n == 1:  # one block: nothing to difference; the head is the outer part's only matmul
        outer = {name: 0 for name in _FIGURES}
    blocks = [{name: singles[name][i] - outer[name] for name in _FIGURES} for i in range(n)]
    return blocks, outer


_PIPELINED = ("compute_s", "elementwise_s", "overhead_s", "a2a_s", "tp_comm_s")  # cost.py's terms a stage runs per micro-batch


def pipeline_time(plan: SpecPlan, backend, one: dict, **evaluate_kwargs) -> dict:
    """`one` (cost.evaluate's figures of `plan`, pp > 1, average stage) with the pipeline's
    time from its real stages (module docstring): bubble_s is what the step adds to the average
    stage's pipelined work, step_s, tokens_per_s and mfu follow, and pipeline_idle_s is the
    least busy rank's wait plus the stage sends (what `profile` measures per rank)."""
    from moespec.sim.cost import evaluate

    n, p = len(plan.layers), plan.parallel
    whole = dataclasses.replace(plan, parallel=dataclasses.replace(p, pp=1, pp_layers=None))
    out = evaluate(DesignBatch.from_plans([whole] + [_one_block(plan, i) for i in range(n)]), backend, **evaluate_kwargs)
    m = p.grad_accum
    per_micro = sum(np.asarray(out[name], dtype=np.float64) for name in _PIPELINED) / m
    outer = (per_micro[1:].sum() - per_micro[0]) / (n - 1) if n > 1 else 0.0
    blocks = per_micro[1:] - outer
    active = np.asarray(out["params_active"], dtype=object)  # the split's weights, from the same evaluation (block_figures' difference)
    active_outer = (active[1:].sum() - active[0]) // (n - 1) if n > 1 else 0
    bounds = _bounds(plan, [{"params_active": a - active_outer} for a in active[1:]])
    stage_s = [float(blocks[lo:hi].sum()) + (outer if s == len(bounds) - 1 else 0.0) for s, (lo, hi) in enumerate(bounds)]
    rank_s = [sum(stage_s[s] for s in stages) for stages in rank_stages(plan)]
    v = stages_per_rank(p.pp_schedule)
    pipelined_s = m * max(rank_s) + (sum(rank_s) - max(rank_s)) / v
    average_s = sum(one[name] for name in _PIPELINED)
    fixed = dict(one)
    pipelined_s, average_s = float(pipelined_s), float(average_s)
    fixed["bubble_s"] = max(pipelined_s - average_s, 0.0)
    fixed["step_s"] = one["step_s"] - one["bubble_s"] + fixed["bubble_s"]
    fixed["tokens_per_s"] = one["tokens_per_s"] * one["step_s"] / fixed["step_s"]
    fixed["mfu"] = one["mfu"] * one["step_s"] / fixed["step_s"]
    fixed["pipeline_idle_s"] = pipelined_s - m * min(rank_s) + one["pp_comm_s"]
    fixed["stage_s_per_microbatch"] = rank_s
    return fixed


def _bounds(plan: SpecPlan, blocks: list[dict]) -> list[tuple[int, int]]:
    """The runtime's stage split (spec/stages.py) on the blocks' active parameters per token."""
    p, m = plan.parallel, plan.model
    return stage_bounds(plan, p.pp * stages_per_rank(p.pp_schedule), [int(b["params_active"]) for b in blocks], m.vocab_size * m.d_model)


def busiest_rank(plan: SpecPlan) -> dict:
    """The figures of the pipeline rank that holds the most parameters (ties: the first), and
    of the rank that computes the most FLOPs, per micro-step; with the split and per-rank lists."""
    p, m = plan.parallel, plan.model
    blocks, outer = block_figures(plan)
    bounds = _bounds(plan, blocks)
    n_stages = len(bounds)
    embedding = m.vocab_size * m.d_model + (m.seq_len * m.d_model if m.positions == "learned" else 0)
    chunk = lambda rows, width: _chunk(rows, width, p.dp)  # noqa: E731  (FSDP2's Shard(0) over dp, counts.py's)
    embedding_sharded = chunk(m.vocab_size, m.d_model) + (chunk(m.seq_len, m.d_model) if m.positions == "learned" else 0)
    gathers = p.zero_stage == 1 and p.dp > 1
    ranks = []
    for stages in rank_stages(plan):
        fig = {name: 0 for name in _FIGURES}
        for s in stages:
            for block in blocks[bounds[s][0] : bounds[s][1]]:
                for name in _FIGURES:
                    fig[name] += block[name]
            for name in ("tp_all_gather_calls", "tp_all_gather_bytes"):  # sequence parallelism: the first block's
                fig[name] += outer[name] // 2 * ((s == 0) + (s == n_stages - 1))  # input gradient, the final norm's input
            if s == 0:
                fig["params_total"] += embedding
                fig["sharded"] += embedding_sharded
            if s == n_stages - 1:  # final norm and head: the outer part less the embeddings, and a tied head's table
                tied = m.vocab_size * m.d_model if m.tied_embeddings else 0
                fig["params_total"] += outer["params_total"] - embedding + tied
                fig["sharded"] += outer["sharded"] - embedding_sharded + (chunk(m.vocab_size, m.d_model) if m.tied_embeddings else 0)
                for name in ("step_flops", "flops_lm_head"):
                    fig[name] += outer[name]
        # ZeRO-1 gathers the rank's non-block parameters (embeddings on the first stage, the
        # final norm and head on the last) as one unit, beside its blocks'
        fig["zero_all_gather_calls"] += int(gathers and (0 in stages or n_stages - 1 in stages))
        dense = fig["params_total"] - fig["expert_params"] - fig["tp_saved_params"]
        held = dense + fig["expert_params"] // p.ep
        trainable = held - fig["frozen_params"]
        sharded = fig["sharded"]  # ZeRO-1's chunks (pp allows stages 0 and 1)
        ranks.append({
            "stages": [bounds[s] for s in stages],
            "params_bytes": 4 * int(held),
            "grads_bytes": 4 * int(trainable),
            "optimizer_bytes": int(round(8 * (sharded - fig["frozen_sharded"]))) if p.zero_stage >= 1 else 8 * int(trainable),
            "step_flops": int(fig["step_flops"] - fig["tp_saved_flops"]),
            "zero_all_gather_calls": int(fig["zero_all_gather_calls"]),
            **{name: int(fig[name]) for name in _TP},
        })  # fmt: skip
    by_params = max(ranks, key=lambda r: r["params_bytes"])
    return {"bounds": bounds, "ranks": ranks, "most_state": by_params, "most_flops": max(ranks, key=lambda r: r["step_flops"])}
