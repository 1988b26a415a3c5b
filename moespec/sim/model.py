"""`simulate(plan, backend)`: the cost model (cost.py) on a batch of one plan, as a report.

No formula lives here: every figure is `cost.evaluate` of `DesignBatch.from_plans([plan])`,
the same function the explorer runs on millions of designs, so the two cannot disagree.
This module only turns the (1,) arrays into the report `moespec simulate` prints and into
small records (`step_time`, `memory_per_device`) for code that wants one figure.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from moespec.sim.backend import Backend
from moespec.sim.cost import DEFAULT_OVERLAP, evaluate
from moespec.sim.memory import ALLOCATOR_ALLOWANCE
from moespec.sim.counts import TP_COLLECTIVES, compute_bytes, flops_by_part
from moespec.sim.design import DesignBatch
from moespec.sim.load import Load, a2a_bytes_per_rank, imbalance_factors, layer_load
from moespec.spec.plan import SpecPlan



@dataclass(frozen=True)
class MemoryPrediction:
    weights_bytes: float  # parameters held at rest (fp32; ZeRO-2/3: this rank's shard)
    gathered_weights_bytes: float  # parameters FSDP2 gathers for compute (ZeRO-2: all; ZeRO-3: a block)
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    a2a_buffers_bytes: float
    allowance_bytes: float
    total_bytes: float
    device_bytes: float
    fits: bool


@dataclass(frozen=True)
class TimePrediction:
    compute_s: float  # matmul time of all micro-steps (roofline), recomputation included
    elementwise_s: float  # memory-bound passes: stored activations, Sinkhorn, dropout
    overhead_s: float  # fixed host time (dispatch, launches) from the backend's overheads
    a2a_s: float  # expert dispatch/combine and BASE shuffle all-to-alls, on the critical path
    tp_comm_s: float  # tensor-parallel collectives over the topology (their host time is in overhead_s)
    pp_comm_s: float  # pipeline sends between neighbouring stages
    dp_allreduce_s: float  # ZeRO 0/1: dense gradients over dp, expert gradients over dp/ep
    zero_comm_s: float  # ZeRO-1 parameter all-gather; ZeRO-2/3 reduce-scatters and all-gathers
    exposed_allreduce_s: float  # the part of data-parallel traffic not hidden behind compute
    bubble_s: float
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    model_flops_per_token: float
    pipeline_idle_s: float | None = None  # pp > 1: the least busy rank's wait and the stage sends per step


def _evaluate(plan: SpecPlan, backend: Backend, *, overlap: float, imbalance: float, a2a_imbalance: float | None = None) -> dict:
    p = plan.parallel
    if p.world > backend.num_devices:
        raise ValueError(f"the spec needs {p.world} devices; backend {backend.name} has {backend.num_devices}")
    out = evaluate(DesignBatch.from_plans([plan]), backend, overlap=overlap, imbalance=imbalance, a2a_imbalance=a2a_imbalance)
    one = {name: value[0].item() for name, value in out.items()}
    if p.pp > 1:  # one plan: its real stages, not the average one (sim/stages.py)
        from moespec.sim.stages import pipeline_time

        one = pipeline_time(plan, backend, one, overlap=overlap, imbalance=imbalance, a2a_imbalance=a2a_imbalance)
    return one


def _time(one: dict) -> TimePrediction:
    values = {f.name: one.get(f.name) for f in fields(TimePrediction)}
    values["dp_allreduce_s"] = one["allreduce_s"]
    values["model_flops_per_token"] = float(one["model_flops_per_token"])
    return TimePrediction(**values)


def _memory(one: dict, backend: Backend) -> MemoryPrediction:
    values = {f.name: one.get(f"memory_{f.name}") for f in fields(MemoryPrediction)}
    values.update(device_bytes=float(backend.device.memory_bytes), fits=bool(one["fits"]))
    return MemoryPrediction(**values)


def step_time(plan: SpecPlan, backend: Backend, *, overlap: float = DEFAULT_OVERLAP, imbalance: float = 1.0) -> TimePrediction:
    """The time model's figures for one optimizer step of `plan` (cost.py)."""
    return _time(_evaluate(plan, backend, overlap=overlap, imbalance=imbalance))


def memory_per_device(plan: SpecPlan, backend: Backend) -> MemoryPrediction:
    """Peak bytes on one device of `plan`, by part (cost.py)."""
    return _memory(_evaluate(plan, backend, overlap=DEFAULT_OVERLAP, imbalance=1.0), backend)


def simulate(plan: SpecPlan, backend: Backend, *, overlap: float = DEFAULT_OVERLAP, imbalance: float = 1.0,
             load: Load | None = None) -> dict:  # fmt: skip
    """Everything `moespec simulate` reports, as plain data. `load` (sim/load.py) replaces the
    single `imbalance` knob by what a load model or a measured histogram implies."""
    a2a_imbalance = factors = None
    if load is not None:
        factors = imbalance_factors(plan, load)
        imbalance, a2a_imbalance = factors["compute_imbalance"], factors["a2a_imbalance"]
    one = _evaluate(plan, backend, overlap=overlap, imbalance=imbalance, a2a_imbalance=a2a_imbalance)
    timing = _time(one)
    by_part = flops_by_part(one)
    total_flops = sum(by_part.values())
    # Compute time split in proportion to FLOPs (an estimate: the operator database times the
    # families apart, but the report keeps one split for both time models).
    compute_by_part_s = {name: timing.compute_s * flops / total_flops for name, flops in by_part.items()}
    report = {
        "spec": plan.name,
        "backend": backend.name,
        "world": plan.parallel.world,
        "dp": plan.parallel.dp,
        "ep": plan.parallel.ep,
        "tp": plan.parallel.tp,
        "pp": plan.parallel.pp,
        "global_batch": plan.parallel.global_batch,
        "params": {"total": one["params_total"], "active": one["params_active"], "embedding": one["params_embedding"],
                   "embeddings_in_active": True},  # fmt: skip
        "step_flops_per_rank_microstep": one["step_flops"] - one["tp_saved_flops"],  # pp > 1: the busiest stage's (_busiest_stage)
        "step_flops_by_part": by_part,
        "compute_s_by_part": compute_by_part_s,
        "a2a_bytes_per_rank_microstep": one["a2a_bytes"],
        "shuffle_a2a_bytes_per_rank_microstep": one["shuffle_a2a_bytes"],
        "a2a_calls_per_rank_microstep": one["a2a_calls"],
        **{f"tp_{kind}_{unit}_per_rank_microstep": one[f"tp_{kind}_{unit}"] for kind in TP_COLLECTIVES for unit in ("calls", "bytes")},
        "collective_calls_per_step": {"all_to_all": one["a2a_calls"] * plan.parallel.grad_accum,
                                      "all_gather": one["zero_all_gather_calls"], "reduce_scatter": one["zero_reduce_scatter_calls"]},
        "state_bytes_per_rank": {name: int(one[f"state_{name}_bytes"]) for name in ("params", "grads", "optimizer")},
        "memory_per_device": _memory(one, backend).__dict__,
        "time": timing.__dict__,
        "assumptions": {
            "allocator_allowance": ALLOCATOR_ALLOWANCE,
            "allreduce_overlap": overlap,
            "dropless_imbalance": imbalance,
            "a2a_imbalance": imbalance if a2a_imbalance is None else a2a_imbalance,
            "efficiencies": {"matmul": backend.matmul_efficiency, "memory": backend.memory_efficiency},
            "overheads": backend.overheads.as_dict(),
            "calibration": backend.calibration,
            "time_model": ("operator database (sim/opdb.py): each op family of the step at its measured cost"
                           if backend.ops is not None else "roofline (uncalibrated): matmul FLOPs at peak x efficiency, bytes at bandwidth"),
            "state": "fp32 parameters and gradients, fp32 AdamW m and v at every precision (autocast); "
                     "ZeRO shards by rows (FSDP2 Shard(0)): dense over dp, experts over dp/ep",
        },
    }
    auction = base_auction_caveat(plan)
    if auction:
        report["assumptions"]["base_auction"] = auction
    if load is not None:
        report["load"] = _load_report(plan, load, factors)
    if plan.parallel.pp > 1:
        _busiest_stage(report, plan, backend)
    return report


def base_auction_caveat(plan: SpecPlan) -> str | None:
    """What the step time leaves out of BASE's auction, for a spec with BASE layers (None
    without). Why it is said rather than modelled: the operator database times the solver at
    its default eps on groups whose T is a multiple of E (profiling/opbench.py). An
    `auction_eps` is absolute, so its cost depends on the router's score range at run time,
    which no spec states; and the filler rows that pad T up to a multiple of E cost more than
    their share (bench/base_solver.py --filler: 1.1-1.4x the compiled solve at E 48-200, up
    to 2x with the numpy one). Parameters, FLOPs and all-to-all bytes do not depend on either."""
    layers = [layer for layer in plan.moe_layers if layer.moe.router.type == "base"]
    if not layers:
        return None
    said = ["BASE's auction is timed at its default eps, on groups whose T is a multiple of E"]
    eps = sorted({layer.moe.router.auction_eps for layer in layers if layer.moe.router.auction_eps is not None})
    if eps:
        said.append(f"auction_eps {', '.join(f'{e:g}' for e in eps)} is not modelled (coarser runs faster, finer slower)")
    groups = sorted({(plan.tokens_of(layer), layer.moe.experts.count) for layer in layers})  # (T, E); an encoder's T is its own
    padded = [(t, e) for t, e in groups if t % e]
    if padded:
        said.append("filler rows pad " + ", ".join(f"T {t} over E {e} ({-t % e} rows)" for t, e in padded)
                    + ": they cost more than their share and are not modelled")  # fmt: skip
    return "; ".join(said)


def _busiest_stage(report: dict, plan: SpecPlan, backend: Backend) -> None:
    """pp > 1: per-rank counts of the pipeline rank that holds (or computes) the most, exactly
    (sim/stages.py), instead of 1/pp of the model; activations and times stay the average stage's."""
    from moespec.sim.stages import busiest_rank

    stages = busiest_rank(plan)
    most = stages["most_state"]
    memory = report["memory_per_device"]
    new = {"weights": most["params_bytes"], "grads": most["grads_bytes"], "optimizer": most["optimizer_bytes"]}
    memory["total_bytes"] += sum(new[k] - memory[f"{k}_bytes"] for k in new)
    for key, value in new.items():
        memory[f"{key}_bytes"] = value
    memory["allowance_bytes"] = ALLOCATOR_ALLOWANCE * memory["total_bytes"]
    memory["fits"] = memory["total_bytes"] + memory["allowance_bytes"] <= backend.device.memory_bytes
    report["state_bytes_per_rank"] = {"params": new["weights"], "grads": new["grads"], "optimizer": new["optimizer"]}
    report["step_flops_per_rank_microstep"] = stages["most_flops"]["step_flops"]
    for kind in TP_COLLECTIVES:
        for unit in ("calls", "bytes"):
            report[f"tp_{kind}_{unit}_per_rank_microstep"] = max(r[f"tp_{kind}_{unit}"] for r in stages["ranks"])
    report["collective_calls_per_step"]["all_gather"] = max(r["zero_all_gather_calls"] for r in stages["ranks"])  # ZeRO-1: one per tensor of the rank's stages
    report["pipeline"] = {"schedule": plan.parallel.pp_schedule, "stages": stages["bounds"], "ranks": stages["ranks"],
                          "note": "per-rank counts and state: the pipeline rank with the most; activations and times: the average stage"}  # fmt: skip


def _load_report(plan: SpecPlan, load: Load, factors: dict) -> dict:
    """What the load implies per rank and layer (sim/load.py), beside the step's figures."""
    b = int(compute_bytes(DesignBatch.from_plans([plan]))[0])
    per_layer = {}
    for layer in plan.moe_layers:
        ll = layer_load(plan, load, layer)
        per_layer[str(layer.index)] = {"expert_rows_per_rank": ll.expert_rows_P.tolist(), "sent_rows_per_rank": ll.send_rows_P.tolist(),
                                       "received_rows_per_rank": ll.recv_rows_P.tolist(), "dropped_fraction": ll.dropped_fraction}  # fmt: skip
    return {"kind": load.kind, "source": load.source, **factors,
            "a2a_bytes_per_rank_microstep": a2a_bytes_per_rank(plan, load, b), "layers": per_layer}
