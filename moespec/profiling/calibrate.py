"""`moespec calibrate`: measure this machine's operators and write the database the cost model
sums along a step's op list (sim/opdb.py, sim/ops.py), plus the links between its ranks.

Measured, each by its own micro-benchmark (profiling/opbench.py), at the shapes models use:
Linear forward + backward on an (M, K, N) grid per dtype, causal attention on an (S, hd) grid
per dtype, gather/scatter rows, clipping + AdamW per tensor and per parameter, collectives by
bytes over the N ranks (link latency and bandwidth fitted through the topology model, then
the all-reduce's scale over the ideal ring).
The dropless experts (the real grouped kernel, per group by rows and width), BASE's auction and
the memory-bound ops' bandwidth come from micro-benchmarks of the real code too.
Fitted: two figures, host seconds per op (`op_s`: ATen dispatch, autograd, Python modules,
DDP's hooks at N ranks) and per optimizer step (`step_s`: train_step's own Python), from whole training steps of six small models that no user spec
resembles (dense width 16 at 32 tokens with 1 and 3 blocks, width 64 at 4096 tokens with 1
and 3 blocks, a width-16 dropless block with 4 and 16 experts), data parallel over the N
ranks, timed interleaved. Each model's step is predicted by the cost model itself as known
part + op_s * ops, so the fit is linear; their median error is the calibration's error band.
The held-out specs of bench/accuracy.py are judged against it; none of them is among the six.
At an even number of ranks three toy models more give one figure each, what their step
leaves beyond the model per call of what it adds: `a2a_call_s` per all-to-all (ep 2),
`tp_call_s` per tensor-parallel collective (DTensor's dispatch around it: tp 2) and
`pp_micro_s` per micro-batch and stage (the schedule's host time: pp 2, 1F1B). The shipped
tp/pp specs (tiny-tp2, tiny-pp2, tiny-tp2-pp2) judge the last two; they are not fitted on.
An earlier version fitted host seconds per block and router on such models together with the
bandwidth and matmul efficiency: the three could not be told apart and extrapolated badly.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import socket
import statistics

import numpy as np
import torch

from moespec.sim.backend import Backend, LinkSpec
from moespec.sim.collectives import all_reduce_time_s, all_to_all_time_s
from moespec.sim.model import step_time
from moespec.sim.overhead import Overheads
from moespec.sim.topology import build_topology
from moespec.spec import plan_from_text

_FIT_SPEC = """
version: 1
name: {name}
model: {{vocab_size: 256, d_model: {d}, n_layers: {layers}, n_heads: 2, d_ff: {ff}, seq_len: {seq}}}
{moe}
parallelism: {{dp: {world}, micro_batch: {batch}, global_batch: {global_batch}}}
"""
_DROPLESS = "moe: {{placement: {{type: layers, layers: [1]}}, experts: {{count: {e}, d_ff: 16}}, router: {{type: topk, k: 2}}, capacity: {{dropless: true}}}}"
_EP = "moe: {placement: {type: layers, layers: [1]}, experts: {count: 4, d_ff: 16}, router: {type: topk, k: 2}, capacity: {factor: 2.0}}"


def ep_plan(world: int):
    """The toy model whose all-to-alls give the wait per call (world > 1, even): a width-16
    capacity block with its experts over 2 ranks."""
    text = _FIT_SPEC.format(name="fit-ep2", d=16, ff=32, layers=2, seq=16, batch=2, moe=_EP, world=world, global_batch=2 * world)
    text = text.replace(f"dp: {world},", f"dp: {world}, ep: 2,")
    return plan_from_text(text, "ep2")


def split_plans(world: int) -> dict[str, object]:
    """The toy models whose steps give the tensor- and pipeline-parallel host terms (world
    even): `tp2`, two dense width-32 blocks split over 2 tp ranks (8 all-reduces a
    micro-step), and `pp2`, two width-16 blocks over 2 stages under 1F1B with 4 micro-batches."""
    dp = world // 2
    tp = _FIT_SPEC.format(name="fit-tp2", d=32, ff=64, layers=2, seq=16, batch=2, moe="", world=dp, global_batch=2 * dp)
    pp = _FIT_SPEC.format(name="fit-pp2", d=16, ff=32, layers=2, seq=16, batch=2, moe="", world=dp, global_batch=8 * dp)
    return {"tp2": plan_from_text(tp.replace(f"dp: {dp},", f"dp: {dp}, tp: 2,"), "tp2"),
            "pp2": plan_from_text(pp.replace(f"dp: {dp},", f"dp: {dp}, pp: 2, pp_schedule: 1f1b,"), "pp2")}


def fit_plans(world: int = 1) -> dict[str, object]:
    """The six small models of the fit (module docstring), data parallel over `world` ranks."""
    shapes = {"host1": (16, 32, 1, 16, 2, ""), "host3": (16, 32, 3, 16, 2, ""),
              "bytes1": (64, 128, 1, 512, 8, ""), "bytes3": (64, 128, 3, 512, 8, ""),
              "group4": (16, 32, 2, 16, 2, _DROPLESS.format(e=4)), "group16": (16, 32, 2, 16, 2, _DROPLESS.format(e=16))}  # fmt: skip
    plans = {}
    for name, (d, ff, layers, seq, batch, moe) in shapes.items():
        text = _FIT_SPEC.format(name=f"fit-{name}", d=d, ff=ff, layers=layers, seq=seq, batch=batch, moe=moe, world=world,
                                global_batch=batch * world)  # fmt: skip
        plans[name] = plan_from_text(text, name)
    return plans


def _link_coefficients(backend: Backend, kind: str, world: int, nbytes: float) -> tuple[float, float]:
    """(seconds per unit latency, seconds per unit 1/bandwidth) of one collective in the model."""

    def modelled(latency_s: float, bandwidth_Bps: float) -> float:
        link = LinkSpec(bandwidth_Bps, latency_s, 1.0)
        graph = build_topology(dataclasses.replace(backend, intra_node=link, inter_node=backend.inter_node and link))
        ranks = list(range(world))
        if kind == "all_to_all":
            return all_to_all_time_s(graph, ranks, nbytes / world)
        return all_reduce_time_s(graph, ranks, nbytes)

    return modelled(1.0, 1e30), modelled(0.0, 1.0)


def fit_link(backend: Backend, world: int, a2a: list[dict], allreduce: list[dict]) -> tuple[LinkSpec, float, float, float]:
    """(link, its median relative error on the all-to-alls, all-reduce scale, its error).

    The link's latency and bandwidth minimise the relative error of the all-to-alls (the MoE
    layer's collective) through the topology model. The library's all-reduce is then compared
    with the ideal ring on that link: their median ratio is the all-reduce scale (gloo's ring
    on 2 ranks of one core each is far from ideal; NCCL's is close to 1)."""
    rows = []
    for m in a2a:
        c_lat, c_bw = _link_coefficients(backend, "all_to_all", world, m["bytes"])
        rows.append([c_lat / m["seconds"], c_bw / m["seconds"]])  # divided: relative error
    (latency_s, inv_bw), *_ = np.linalg.lstsq(np.array(rows), np.ones(len(rows)), rcond=None)
    latency_s, inv_bw = max(float(latency_s), 0.0), max(float(inv_bw), 1e-15)
    link_error = statistics.median(abs(row[0] * latency_s + row[1] * inv_bw - 1.0) for row in rows)
    ratios = []
    for m in allreduce:
        c_lat, c_bw = _link_coefficients(backend, "all_reduce", world, m["bytes"])
        ratios.append(m["seconds"] / (c_lat * latency_s + c_bw * inv_bw))
    scale = max(statistics.median(ratios), 1e-3)
    scale_error = statistics.median(abs(r / scale - 1) for r in ratios)
    return LinkSpec(1.0 / inv_bw, latency_s, 1.0), link_error, scale, scale_error


def machine_facts(device: torch.device, nproc: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count() or 1,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "nproc": nproc,
        "threads_per_rank": torch.get_num_threads(),
        "cpu_features": cpu_features(),
    }


# The flags that change a CPU's matmul rates by integer factors: bf16 on a CPU without them
# ran 20-30x slower than with them on two VMs of the same name (README, Calibrate).
_MATRIX_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_features() -> list[str]:
    """torch's CPU kernel level (DEFAULT, AVX2, AVX512, ...) and the bf16 / matrix flags the
    kernel's OS reports: two machines that differ here run the same ops at different rates,
    so a calibration made on one does not hold on the other (`profile` says so)."""
    features = [torch.backends.cpu.get_cpu_capability()]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return features + [flag for flag in _MATRIX_FLAGS if flag in flags]


def _unit_terms(plan, backend: Backend) -> tuple[float, np.ndarray]:
    """(seconds the model gives with no host ops, seconds per unit of [op_s, step_s]) of
    plan's step: the step is linear in the two."""
    db = backend.ops

    def predict(op_s: float = 0.0, step_s: float = 0.0) -> float:
        unit = dataclasses.replace(db, op_s=op_s, step_s=step_s)
        return step_time(plan, dataclasses.replace(backend, ops=unit)).step_s

    rest = predict()
    return rest, np.array([predict(op_s=1.0), predict(step_s=1.0)]) - rest


def fit_host(seconds: dict[str, float], backend: Backend, plans: dict) -> tuple[dict, float, list[dict]]:
    """({op_s, step_s}, median relative error, records): the fitted figures, host seconds
    per op and per optimizer step (train_step's own Python: zeroing, the loss, starting
    backward, the optimizer's loop), by least squares in relative error over the fit models,
    each predicted by the cost model with every other figure measured (_unit_terms).
    (A third figure, a factor on the measured work inside a step, was tried and dropped: it
    fitted the fp32 toy models and made the held-out bf16 and world-1 specs worse.)"""
    terms = {name: _unit_terms(plan, backend) for name, plan in plans.items()}
    rows = np.array([terms[name][1] / seconds[name] for name in plans])
    target = np.array([1.0 - terms[name][0] / seconds[name] for name in plans])
    solution, *_ = np.linalg.lstsq(rows, target, rcond=None)
    x = np.array([max(float(solution[0]), 1e-9), max(float(solution[1]), 0.0)])
    predicted = {name: terms[name][0] + float(terms[name][1] @ x) for name in plans}
    error = statistics.median(abs(predicted[name] / seconds[name] - 1) for name in plans)
    records = [{"name": name, "seconds": seconds[name], "modelled_s": predicted[name]} for name in plans]
    return {"op_s": float(x[0]), "step_s": float(x[1])}, error, records


def calibrate_rank(backend: Backend, *, device: torch.device, world: int, quick: bool = False) -> dict | None:
    """Run every micro-benchmark on this rank (all ranks at once); rank 0 returns the
    calibration document, the others None."""
    import torch.distributed as dist

    from moespec.model import group_matmuls
    from moespec.profiling import microbench, opbench
    from moespec.sim.opdb import database_from_dict

    dtypes = ("fp32", "bf16")
    probe_start_s = opbench.machine_probe_s(device)  # and at the end: the calibration's moment
    engine_s = opbench.backward_call_s(device)
    linear = {dtype: opbench.linear_grid(device, dtype, quick=quick, engine_s=engine_s) for dtype in dtypes}
    bmm = {dtype: opbench.bmm_grid(device, dtype, quick=quick, engine_s=engine_s) for dtype in dtypes}
    attention = {dtype: opbench.attention_grid(device, dtype, quick=quick, engine_s=engine_s) for dtype in dtypes}
    gather_Bps = opbench.gather_bandwidth(device)
    auction = opbench.auction_grid(device, quick=quick)
    bandwidth_Bps = opbench.elementwise_bandwidth(device)
    grouped = {dtype: opbench.grouped_grid(device, dtype, quick=quick, engine_s=engine_s) for dtype in dtypes}
    optimizer_op_s, optimizer_param_s = opbench.optimizer_costs(device)
    repeats = 5 if quick else 10
    a2a, allreduce = microbench.time_collectives(device, repeats=repeats) if world > 1 else ([], [])
    if world > 1:
        link, link_error, allreduce_scale, allreduce_error = fit_link(backend, world, a2a, allreduce)
    else:  # nothing to measure between ranks: the backend's own link stands
        link, link_error, allreduce_scale, allreduce_error = backend.intra_node, 0.0, backend.allreduce_scale, 0.0
    ops = {"linear": linear, "bmm": bmm, "attention": attention, "auction": auction, "grouped": grouped, "op_s": 0.0, "step_s": 0.0, "a2a_call_s": 0.0, "optimizer_op_s": optimizer_op_s,
           "optimizer_param_s": optimizer_param_s, "bandwidth_Bps": bandwidth_Bps, "gather_Bps": gather_Bps}  # fmt: skip
    ops = opbench.slowest_rank(ops)  # every rank measured the same points at once (lockstep); a step runs at the slowest's pace
    threaded = group_matmuls.equal_groups_threaded_flops(torch.empty(1, 1, 1, device=device))  # what the kernel does with BASE's groups here
    if math.isfinite(threaded):
        ops["equal_groups_threaded_flops"] = threaded
    bandwidth_Bps = ops["bandwidth_Bps"]
    partial = dataclasses.replace(backend, intra_node=link, allreduce_scale=allreduce_scale, overheads=Overheads(),
                                  ops=database_from_dict(ops))  # fmt: skip
    plans = fit_plans(world)
    dist_ctx = None
    if world > 1:
        from moespec.distributed.context import init_distributed

        dist_ctx = init_distributed(next(iter(plans.values())), device=device.type)
    contexts = {name: dist_ctx for name in plans}
    split = {}
    if world > 1 and world % 2 == 0:
        split = {"ep2": ep_plan(world), **split_plans(world)}
        for name, plan in split.items():
            plans[name] = plan
            contexts[name] = init_distributed(plan, device=device.type)
    seconds = microbench.time_training_steps(plans, device, rounds=8 if quick else 25, dist_ctx=contexts if world > 1 else None)
    for name in split:
        plans.pop(name)
    fitted_host, host_error, records = fit_host(seconds, partial, plans)
    ops.update(fitted_host)
    if split:  # what each toy step leaves beyond the model, per call of what it adds (module docstring)
        from moespec.sim.counts import TP_COLLECTIVES, plan_counts

        fitted = dataclasses.replace(partial, ops=database_from_dict(ops))
        for name, key, calls in (("ep2", "a2a_call_s", lambda c, p: c["a2a_calls"] * p.grad_accum),
                                 ("tp2", "tp_call_s", lambda c, p: sum(c[f"tp_{kind}_calls"] for kind in TP_COLLECTIVES) * p.grad_accum),
                                 ("pp2", "pp_micro_s", lambda c, p: p.grad_accum)):  # fmt: skip
            plan = split[name]
            modelled_s = step_time(plan, fitted).step_s
            n_calls = calls(plan_counts(plan), plan.parallel)
            ops[key] = max((seconds[name] - modelled_s) / n_calls, 0.0)
            records.append({"name": name, "seconds": seconds[name], "modelled_s": modelled_s + ops[key] * n_calls})
    probe_s = (probe_start_s + opbench.machine_probe_s(device)) / 2
    if world > 1 and dist.get_rank() != 0:
        return None
    peak = fit_peak_from_grid(linear["fp32"], backend.device.peak_flops_per_s["fp32"])
    scale = peak / backend.device.peak_flops_per_s["fp32"]
    document = {
        "version": 2,
        "backend": backend.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(device, world),
        "probe_s": probe_s,
        "fitted": {
            "peak_flops_per_s": {dtype: value * scale for dtype, value in backend.device.peak_flops_per_s.items()},
            "matmul_efficiency": 1.0,  # the roofline is not used when the database is there; kept for tp/pp terms
            "memory_bandwidth_Bps": bandwidth_Bps,
            "link": {"latency_s": link.latency_s, "bandwidth_Bps": link.effective_bandwidth_Bps},
            "allreduce_scale": allreduce_scale,
            "overhead": Overheads().as_dict(),
        },
        "ops": ops,
        "measurements": {"all_to_all": a2a, "all_reduce": allreduce, "blocks": records},
        "fit_error": {"step": host_error, "all_to_all": link_error, "all_reduce": allreduce_error},
    }
    return document


def fit_peak_from_grid(grid: dict, datasheet_peak: float) -> float:
    """The datasheet fp32 peak, unless a measured Linear ran faster (a VM hiding its clock)."""
    axes, seconds = grid["axes"], grid["seconds"]
    best = max(6 * m * k * n / seconds[i][j][l] for i, m in enumerate(axes["m"]) for j, k in enumerate(axes["k"])
               for l, n in enumerate(axes["n"]))  # fmt: skip
    return max(datasheet_peak, best)
