"""The profile report: every rank's measurement aggregated, beside the simulator's prediction.

Aggregation: a step of the job lasts as long as its slowest rank, so each step's time is the
maximum over ranks, and the report gives the median and spread over steps. Counts (FLOPs,
all-to-all bytes) are per rank per micro-step, the simulator's unit; they must be equal to the
prediction (the all-to-all bytes of dropless routing over several ranks excepted: they follow
the real routing, the prediction assumes balance). Times carry their relative error against the (calibrated) prediction.
"""

from __future__ import annotations

import statistics

from moespec.sim.backend import Backend
from moespec.sim.model import simulate
from moespec.spec.plan import SpecPlan

# A time row is "within the calibrated error" when |error| <= 2x the calibration's median
# step error on its own small models (a two-sigma-like band), and never tighter than 5%: the
# run-to-run noise of a small shared machine.
WITHIN_FLOOR = 0.05


def _relative(measured: float, predicted: float) -> float | None:
    return None if not measured else (predicted - measured) / measured


def routing_dependent(plan: SpecPlan) -> bool:
    """Dropless top-k style layers over several ranks: what a rank sends follows the routing,
    the prediction assumes balance. (BASE is balanced exactly; with ep 1 nothing is sent.)"""
    return plan.parallel.ep > 1 and any(
        layer.moe.capacity is not None and layer.moe.capacity.dropless for layer in plan.moe_layers)


def build_report(plan: SpecPlan, backend: Backend, ranks: list[dict], *, spec: str, device: str, steps: int,
                 warmup: int, threads: int, trace_dir: str | None) -> dict:  # fmt: skip
    """`ranks`: RankMeasurement.as_dict() of every rank, in rank order."""
    p = plan.parallel
    predicted = simulate(plan, backend)
    per_step = [max(values) for values in zip(*(r["step_s"] for r in ranks))]  # slowest rank per step
    median_s = statistics.median(per_step)
    tokens = p.global_batch * plan.model.seq_len
    peak = backend.device.peak_flops_per_s["fp32" if p.precision == "fp32" else p.precision]
    # A rank computes the rows routed to its experts; their mean over the ranks is exact.
    flops_rank = statistics.mean(r["flops_per_microstep"] for r in ranks)
    achieved = sum(r["flops_per_microstep"] for r in ranks) * p.grad_accum / median_s
    model_flops_per_token = predicted["time"]["model_flops_per_token"]
    mfu = model_flops_per_token * tokens / median_s / (p.world * peak)
    a2a_bytes = statistics.mean(r["a2a_bytes_per_microstep"] for r in ranks)
    regions = _mean_regions(ranks)
    scale = median_s / statistics.mean(r["profiled_step_s"] for r in ranks) if all(r["profiled_step_s"] for r in ranks) else 1.0
    a2a_measured_s = (regions.get("dispatch_a2a", 0.0) + regions.get("combine_a2a", 0.0)) * scale
    time = predicted["time"]
    rows = [
        _row("step time (s, median)", median_s, time["step_s"]),
        _row("tokens/s", tokens / median_s, time["tokens_per_s"]),
        _row("MFU", mfu, time["mfu"]),
        _row("matmul FLOPs per rank per micro-step (mean)", flops_rank, predicted["step_flops_per_rank_microstep"], exact=True),
        _row("all-to-all bytes per rank per micro-step", a2a_bytes, predicted["a2a_bytes_per_rank_microstep"], exact=not routing_dependent(plan)),
        _row("all-to-all time per step, transfer + wait (s)", a2a_measured_s, time["a2a_s"] + _a2a_wait_s(plan, backend, predicted)),
    ]
    shuffle = max(r["shuffle_bytes_per_microstep"] for r in ranks)
    if shuffle or predicted["shuffle_a2a_bytes_per_rank_microstep"]:
        rows.insert(5, _row("BASE shuffle bytes per rank per micro-step", shuffle, predicted["shuffle_a2a_bytes_per_rank_microstep"], exact=True))
    # State at rest after a step, on the rank that holds the most (REFERENCE sec. 4): exact.
    for kind, label in (("params", "parameters"), ("grads", "gradients"), ("optimizer", "optimizer state")):
        held = max(r["state_bytes"][kind] for r in ranks)
        rows.append(_row(f"{label} held per rank (bytes)", held, predicted["state_bytes_per_rank"][kind], exact=True))
    band = None if backend.calibration_error is None else max(2 * backend.calibration_error, WITHIN_FLOOR)
    for row in rows:
        if not row["exact"] and band is not None and row["relative_error"] is not None:
            row["within_calibrated_error"] = abs(row["relative_error"]) <= band
    memory = _memory(ranks, predicted)
    return {
        "spec": spec,
        "name": plan.name,
        "backend": backend.name,
        "calibration": backend.calibration,
        "device": device,
        "world": p.world,
        "dp": p.dp,
        "ep": p.ep,
        "threads_per_rank": threads,
        "steps": steps,
        "warmup": warmup,
        "global_batch": p.global_batch,
        "grad_accum": p.grad_accum,
        "measured": {
            "step_s": {"median": median_s, "min": min(per_step), "max": max(per_step), "per_step": per_step},
            "tokens_per_s": tokens / median_s,
            "achieved_flops_per_s": achieved,
            "mfu": mfu,
            "flops_per_rank_microstep": [r["flops_per_microstep"] for r in ranks],
            "a2a_bytes_per_rank_microstep": [r["a2a_bytes_per_microstep"] for r in ranks],
            "a2a_calls_per_rank_microstep": [r["a2a_calls_per_microstep"] for r in ranks],
            "a2a_s": a2a_measured_s,
            "region_s": {name: seconds * scale for name, seconds in regions.items()},
            "region_s_note": "seconds per step by region, from the profiled steps scaled to the median untraced step",
            "memory": memory,
            "expert_load": _expert_load(ranks),
        },
        "predicted": predicted,
        "comparison": rows,
        "exact_counts": all(r["equal"] for r in rows if r["exact"]),
        "calibrated_error_band": band,
        "trace_dir": trace_dir,
        "ranks": ranks,
    }


def _a2a_wait_s(plan: SpecPlan, backend: Backend, predicted: dict) -> float:
    """The calibrated wait of the expert-parallel all-to-alls, which the simulator books as host
    overhead (sim/overhead.py) per transfer; the profiler's all-to-all regions include it."""
    if plan.parallel.ep == 1:
        return 0.0
    calls = predicted["collective_calls_per_step"]["all_to_all"]
    return backend.overheads.a2a_call_s * calls / plan.parallel.pp


def _row(figure: str, measured: float, predicted: float, *, exact: bool = False) -> dict:
    return {"figure": figure, "measured": measured, "predicted": predicted, "relative_error": _relative(measured, predicted),
            "exact": exact, "equal": measured == predicted}  # fmt: skip


def _mean_regions(ranks: list[dict]) -> dict[str, float]:
    names = sorted({name for r in ranks for name in r["region_s"]})
    return {name: statistics.mean(r["region_s"].get(name, 0.0) for r in ranks) for name in names}


def _memory(ranks: list[dict], predicted: dict) -> dict:
    peak = max(r["peak_memory_bytes"] for r in ranks)
    baseline = max(r["baseline_memory_bytes"] for r in ranks)
    return {
        "kind": ranks[0]["memory_kind"],
        "peak_bytes": peak,
        "baseline_bytes": baseline,
        "above_baseline_bytes": peak - baseline,
        "predicted_total_bytes": predicted["memory_per_device"]["total_bytes"],
    }


def _expert_load(ranks: list[dict]) -> dict[str, dict]:
    """Per MoE layer over all ranks: tokens routed to each expert in the timed steps."""
    layers = {}
    for layer in ranks[0]["tokens_per_expert"]:
        counts = [sum(r["tokens_per_expert"][layer][e] for r in ranks) for e in range(len(ranks[0]["tokens_per_expert"][layer]))]
        mean = sum(counts) / len(counts)
        layers[layer] = {
            "tokens_per_expert": counts,
            "min": min(counts), "mean": mean, "max": max(counts),
            "max_over_mean": max(counts) / mean if mean else 0.0,
            "dropped_fraction": statistics.mean(r["dropped_fraction"][layer] for r in ranks),
        }  # fmt: skip
    return layers
