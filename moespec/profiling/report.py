"""The profile report: every rank's measurement aggregated, beside the simulator's prediction.

Aggregation: a step of the job lasts as long as its slowest rank, so each step's time is the
maximum over ranks, and the report gives the median and spread over steps. The spread is the
interquartile range over the median, (p75 - p25) / median of the per-step times: it ignores a
single stray step (a context switch, a page fault) the way min/max cannot, and with the >= 10
timed steps `profile` requires its quartiles are real steps or between two. When the spread is
wider than the calibrated error band, the machine was too noisy for this run to say whether the
prediction is within its band: time rows get the verdict "noisy" instead of "ok" or "out".
The machine probe (opbench.machine_probe_s), timed again before the steps, says how fast the
machine runs against its calibration (`machine_speed`); off by more than the band, `drifted` is
set and printed beside the verdicts. It does not replace them: on the 2-core VM this was built
on, the probe's ratio did not track the steps' reliably (held-out suite, bench/accuracy.py's
`at cal.`: scaling each step by it took the median error from 6.6% to 10.8% in one run and
from 17.6% to 13.5% in another), so it cannot say a prediction was off because of the machine.
Counts (FLOPs,
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
# The fewest timed steps `profile` accepts: the quartiles of fewer say little about the spread.
MIN_TIMED_STEPS = 10


def step_spread(step_s: list[float]) -> float | None:
    """(p75 - p25) / median of the step times (quartiles by `statistics.quantiles`, inclusive
    method); None for fewer than two steps."""
    if len(step_s) < 2:
        return None
    p25, median, p75 = statistics.quantiles(step_s, n=4, method="inclusive")
    return (p75 - p25) / median if median else None


def verdict(relative_error: float | None, *, band: float | None, spread: float | None) -> str | None:
    """A time row's verdict against the calibrated band: "noisy" when the steps' own spread
    exceeds the band (the run cannot tell ok from out), else "ok" (|error| <= band) or "out";
    None without a band or an error."""
    if band is None or relative_error is None:
        return None
    if spread is not None and spread > band:
        return "noisy"
    return "ok" if abs(relative_error) <= band else "out"


def machine_speed(ranks: list[dict], backend: Backend) -> dict:
    """The machine probe now (rank 0's, all ranks timing it at once, as at calibration)
    against the calibration's: speed > 1 runs faster than then. And the CPU's features now
    against the calibration's: `same_cpu` False means another kind of CPU (a bf16 unit more
    or less changes bf16 rates 20-30x), None that the calibration did not record them."""
    now = ranks[0].get("probe_s")
    then = backend.calibration_probe_s
    features = ranks[0].get("cpu_features") or None
    recorded = None if backend.calibration_cpu_features is None else list(backend.calibration_cpu_features)
    same = None if features is None or recorded is None else sorted(features) == sorted(recorded)
    return {"probe_s": now, "calibration_probe_s": then, "vs_calibration": then / now if now and then else None,
            "cpu_features": features, "calibration_cpu_features": recorded, "same_cpu": same}


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
    spread = step_spread(per_step)
    tokens = p.global_batch * (plan.model.seq_len + (plan.model.encoder.seq_len if plan.model.encoder else 0))  # an encoder-decoder: inputs and targets
    peak = backend.device.peak_flops_per_s["fp32" if p.precision == "fp32" else p.precision]
    # A rank computes the rows routed to its experts; their mean over the ranks is exact.
    counted = all(r["flops_per_microstep"] is not None for r in ranks)  # not under tp or pp (measure.py says why)
    flops_rank = statistics.mean(r["flops_per_microstep"] for r in ranks) if counted else None
    achieved = sum(r["flops_per_microstep"] for r in ranks) * p.grad_accum / median_s if counted else None
    model_flops_per_token = predicted["time"]["model_flops_per_token"]
    mfu = model_flops_per_token * tokens / median_s / (p.world * peak)
    a2a_bytes = statistics.mean(r["a2a_bytes_per_microstep"] for r in ranks)
    regions = _mean_regions(ranks)
    scale = median_s / statistics.mean(r["profiled_step_s"] for r in ranks) if all(r["profiled_step_s"] for r in ranks) else 1.0
    a2a_measured_s = (regions.get("dispatch_a2a", 0.0) + regions.get("combine_a2a", 0.0)) * scale
    time = predicted["time"]
    rows = [
        _row("step time (s, median)", median_s, time["step_s"], timed=True),
        _row("tokens/s", tokens / median_s, time["tokens_per_s"], timed=True),
        _row("MFU", mfu, time["mfu"], timed=True),
        _row("all-to-all bytes per rank per micro-step", a2a_bytes, predicted["a2a_bytes_per_rank_microstep"], exact=not routing_dependent(plan)),
        _row("all-to-all time per step, transfer + wait (s)", a2a_measured_s, time["a2a_s"] + _a2a_wait_s(plan, backend, predicted), timed=True),
    ]
    if counted:
        rows.insert(3, _row("matmul FLOPs per rank per micro-step (mean)", flops_rank, predicted["step_flops_per_rank_microstep"], exact=True))
    if p.tp > 1:  # every tp rank contributes the same tensors
        for kind in ("all_reduce", "all_gather", "reduce_scatter"):
            calls, nbytes = (max(r["tp_collectives_per_microstep"].get(kind, [0, 0])[i] for r in ranks) for i in (0, 1))
            if calls or predicted[f"tp_{kind}_calls_per_rank_microstep"]:
                name = kind.replace("_", "-")
                rows.append(_row(f"tensor-parallel {name}s per rank per micro-step", calls, predicted[f"tp_{kind}_calls_per_rank_microstep"], exact=True))
                rows.append(_row(f"tensor-parallel {name} bytes per rank per micro-step", nbytes, predicted[f"tp_{kind}_bytes_per_rank_microstep"], exact=True))
        rows.append(_row("tensor-parallel collective time per step (s)", statistics.mean(r["tp_all_reduce_s"] for r in ranks) * scale, time["tp_comm_s"], timed=True))
    if p.pp > 1:  # the busiest stage waits least: the step waits for the stage that idles most
        idle = max(r["pipeline_idle_s"] for r in ranks)
        rows.append(_row("pipeline idle per step, bubble + stage sends (s)", idle, time["pipeline_idle_s"], timed=True))
    shuffle = max(r["shuffle_bytes_per_microstep"] for r in ranks)
    if shuffle or predicted["shuffle_a2a_bytes_per_rank_microstep"]:
        rows.insert(5, _row("BASE shuffle bytes per rank per micro-step", shuffle, predicted["shuffle_a2a_bytes_per_rank_microstep"], exact=True))
    # State at rest after a step, on the rank that holds the most (REFERENCE sec. 4): exact.
    for kind, label in (("params", "parameters"), ("grads", "gradients"), ("optimizer", "optimizer state")):
        held = max(r["state_bytes"][kind] for r in ranks)
        rows.append(_row(f"{label} held per rank (bytes)", held, predicted["state_bytes_per_rank"][kind], exact=True))
    band = None if backend.calibration_error is None else max(2 * backend.calibration_error, WITHIN_FLOOR)
    machine = machine_speed(ranks, backend)
    speed = machine["vs_calibration"]
    for row in rows:
        if not row["exact"] and band is not None and row["relative_error"] is not None:
            # Times (the median step and what is scaled from it) are judged against the spread
            # of the timed steps; a count that follows the routing (dropless a2a bytes) is not.
            timed = row.pop("timed")
            row["verdict"] = verdict(row["relative_error"], band=band, spread=spread if timed else None)
            row["within_calibrated_error"] = None if row["verdict"] == "noisy" else row["verdict"] == "ok"
        row.pop("timed", None)
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
        "tp": p.tp,
        "pp": p.pp,
        "threads_per_rank": threads,
        "steps": steps,
        "warmup": warmup,
        "global_batch": p.global_batch,
        "grad_accum": p.grad_accum,
        "measured": {
            "step_s": {"median": median_s, "min": min(per_step), "max": max(per_step), "spread": spread,
                       "spread_measure": "interquartile range / median", "per_step": per_step},
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
        "memory_by_category": memory_by_category(ranks, predicted["memory_per_device"]) if all(r["memory_by_category"] for r in ranks)
        else {"source": "not measured under tensor or pipeline parallelism yet", "rows": [], "ranks": []},
        "exact_counts": all(r["equal"] for r in rows if r["exact"]),
        "calibrated_error_band": band,
        "noisy": band is not None and spread is not None and spread > band,
        "machine_speed": machine,
        "drifted": band is not None and speed is not None and abs(speed - 1) > band,
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


def _row(figure: str, measured: float, predicted: float, *, exact: bool = False, timed: bool = False) -> dict:
    return {"figure": figure, "measured": measured, "predicted": predicted, "relative_error": _relative(measured, predicted),
            "exact": exact, "equal": measured == predicted, "timed": timed}  # fmt: skip


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


def memory_by_category(ranks: list[dict], predicted: dict) -> dict:
    """MemTracker's categories (measure.memory_by_category) per rank and their max over ranks,
    beside the simulator's `memory_per_device` terms. Parameters, gradients and optimizer state
    are read just before the optimizer step (every gradient exists then; AdamW's scalar step
    counters taken out, as the simulator leaves them out): exact. Activations and the rest are
    read at the tracked peak; the model's activations (what autograd keeps, counted from the
    model's code: sim/activations.py) and peak get a relative error: the peak may fall
    mid-backward, where some activations are freed and some gradients made."""
    def at_step(r: dict, category: str) -> int:
        held = r["memory_by_category"]["at_optimizer_step"][category]
        return held - r["memory_by_category"]["step_counter_bytes"] if category == "optimizer" else held

    def at_peak(r: dict, *categories: str) -> int:
        return sum(r["memory_by_category"]["peak"][c] for c in categories)

    figures = [  # (figure, measured on one rank, predicted bytes or None, exact)
        ("parameters", lambda r: at_step(r, "parameters"), predicted["weights_bytes"], True),
        ("gradients", lambda r: at_step(r, "gradients"), predicted["grads_bytes"], True),
        ("optimizer state", lambda r: at_step(r, "optimizer"), predicted["optimizer_bytes"], True),
        ("activations (at peak)", lambda r: at_peak(r, "activations"), predicted["activations_bytes"], False),
        ("temporaries, buffers, other (at peak)", lambda r: at_peak(r, "temporaries", "buffers", "other"), None, False),
        ("peak total", lambda r: at_peak(r, "total"), predicted["total_bytes"], False),
    ]
    rows = []
    for figure, measure, expected, exact in figures:
        per_rank = [measure(r) for r in ranks]
        rows.append({"figure": figure, "per_rank": per_rank, "measured": max(per_rank), "predicted": expected,
                     "relative_error": None if expected is None else _relative(max(per_rank), expected),
                     "exact": exact, "equal": exact and max(per_rank) == expected})  # fmt: skip
    return {
        "source": "torch.distributed._tools.mem_tracker.MemTracker over one extra, untimed training step of the model as trained",
        "rows": rows,
        "predicted_a2a_buffers_bytes": predicted["a2a_buffers_bytes"],  # inside activations / temporaries when measured
        "predicted_gathered_weights_bytes": predicted["gathered_weights_bytes"],
        "ranks": [r["memory_by_category"] for r in ranks],
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
