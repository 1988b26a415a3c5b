"""Where a pipeline cuts the model, as a pure function: the runtime (distributed/pipeline.py)
and the simulator (sim/stages.py) both call it, each with its own per-block weights (the
runtime reads them off the built module, the simulator computes them), so agreeing on the
split is part of agreeing on every per-rank figure."""

from __future__ import annotations

from moespec.spec.plan import SpecPlan


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")  # DesignBatch.pp_schedule codes


def stages_per_rank(schedule: str) -> int:
    """Stages each pipeline rank holds: 2 under interleaved 1F1B (Megatron's virtual stages)."""
    return 2 if schedule == "interleaved_1f1b" else 1


def stage_bounds(plan: SpecPlan, n_stages: int, weights: list[int] | None = None, head: int = 0) -> list[tuple[int, int]]:
    """[lo, hi) block ranges of the stages, in order: `parallelism.pp_layers` if written, else the
    contiguous split of `weights` (one per block: its active parameters per token) minimising
    the heaviest stage, the last stage carrying `head` (the LM head's) besides its blocks
    (exact dynamic programme; ties go to earlier cuts)."""
    written = plan.parallel.pp_layers
    if written:
        bounds, lo = [], 0
        for count in written:
            bounds.append((lo, lo + count))
            lo += count
        return bounds
    n = len(plan.layers)
    weights = weights if weights is not None else [1] * n
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[s][i]: the least possible heaviest stage when the first s stages hold blocks [0, i)
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        extra = head if s == n_stages else 0
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(n_stages, 0, -1):
        j = cut[s][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def rank_stages(plan: SpecPlan) -> list[list[int]]:
    """Stage indices each pipeline rank holds, by rank: stage s on rank s % pp."""
    p = plan.parallel
    per_rank = stages_per_rank(p.pp_schedule)
    return [[rank + v * p.pp for v in range(per_rank)] for rank in range(p.pp)]
