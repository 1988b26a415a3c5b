"""`moespec calibrate`: measure this machine and fit the backend's figures to it.

Fits, each from its own micro-benchmarks (profiling/microbench.py):
- matmul efficiency: total FLOPs / (total time * peak) over small-model matmul shapes, so the
  roofline's one efficiency reproduces their summed time exactly;
- memory bandwidth, as the model uses it (elementwise and optimizer bytes): fitted with the
  fixed overheads below, from small models at two sizes, since what a norm or a softmax
  costs per byte inside a training step is not what a streaming `a + b` shows (that one is
  kept in the measurements, unfitted, for reference);
- link latency and bandwidth: least squares, in relative error, of the topology model's
  all-to-all times (sim/collectives.py, affine in latency and 1/bandwidth) against the
  measured ones, at several sizes across the ranks; then the all-reduce scale: measured
  all-reduce over the ideal ring on that link (median ratio);
- fixed host overheads (sim/overhead.py): real training steps, data parallel over the N
  ranks as a real run is (DDP, synchronisation, the slowest rank), of small models (1 and 3 dense
  blocks, and 1 block with 2 micro-steps per optimizer step; 1 dense + 1 MoE block per
  router; 4 and 8 experts; the top-k block again with ep 2, for the all-to-all's wait; 128
  and 512 tokens), each minus its modelled matmul and exposed
  collective time, solved block by block (`fit_overheads`).
The small models have the width of the tiny example specs (d_model 64: "the model's shapes")
but not their depth, routers' settings or expert counts, so the accuracy benchmark tests
predictions of whole models from their parts, not a fit to themselves.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import socket
import statistics

import numpy as np
import torch

from moespec.sim.backend import Backend, LinkSpec
from moespec.sim.collectives import all_reduce_time_s, all_to_all_time_s
from moespec.sim.model import step_time
from moespec.sim.overhead import A2A_CALLS_PER_LAYER, ROUTER_NAMES, Overheads
from moespec.sim.topology import build_topology
from moespec.spec import plan_from_text

_BLOCK_SPEC = """
version: 1
name: {name}
model: {{vocab_size: 256, d_model: 64, n_layers: {layers}, n_heads: 4, d_ff: 128, seq_len: {seq}}}
{moe}
parallelism: {{dp: {world}, ep: {ep}, micro_batch: 8, global_batch: {global_batch}}}
"""
BLOCK_SEQ = {"s": 16, "l": 64}  # two sizes: the difference separates per-byte from fixed costs
ROUTER_BLOCKS = {
    "topk": "{type: topk, k: 2}",
    "noisy_topk": "{type: noisy_topk, k: 2}",
    "switch": "{type: switch}",
    "base": "{type: base}",
    "sinkhorn": "{type: sinkhorn}",
    "expert_choice": "{type: expert_choice}",
    "hash": "{type: hash}",
    "sigmoid_bias": "{type: sigmoid_bias, k: 2}",
}


def block_plans(world: int = 1) -> dict[str, object]:
    """The small models whose steps isolate each fixed overhead, each at two sequence lengths,
    data parallel over `world` ranks (so DDP and the synchronisation of a real run are in)."""
    plans = {}
    for size, seq in BLOCK_SEQ.items():
        for n, accumulate in ((1, 1), (3, 1), (1, 2)):  # 2 micro-steps per optimizer step: its own cost
            name = f"dense{n}" + ("_ga2" if accumulate > 1 else "") + f"@{size}"
            text = _BLOCK_SPEC.format(name=f"dense{n}", layers=n, seq=seq, moe="", world=world, ep=1,
                                      global_batch=8 * world * accumulate)  # fmt: skip
            plans[name] = plan_from_text(text, name)
        for router, block in ROUTER_BLOCKS.items():
            for experts in (4, 8) if router == "topk" else (4,):
                moe = f"moe: {{placement: {{type: layers, layers: [1]}}, experts: {{count: {experts}, d_ff: 64}}, router: {block}}}"
                name = f"moe_{router}_e{experts}@{size}"
                text = _BLOCK_SPEC.format(name=f"moe-{router}", layers=2, seq=seq, moe=moe, world=world, ep=1, global_batch=8 * world)
                plans[name] = plan_from_text(text, name)
        if world > 1 and world % 2 == 0:  # the same top-k block with its experts on 2 ranks: the all-to-all's wait
            moe = "moe: {placement: {type: layers, layers: [1]}, experts: {count: 4, d_ff: 64}, router: {type: topk, k: 2}}"
            name = f"moe_topk_e4_ep2@{size}"
            text = _BLOCK_SPEC.format(name="moe-topk-ep2", layers=2, seq=seq, moe=moe, world=world, ep=2, global_batch=8 * world)
            plans[name] = plan_from_text(text, name)
    return plans


def fit_peak(matmuls: list[dict], datasheet_peak: float) -> float:
    """The datasheet peak, unless a matmul ran faster: then the peak was wrong (a VM hiding
    its clock, a placeholder) and the best measured rate is the honest ceiling."""
    return max(datasheet_peak, max(2 * m["m"] * m["n"] * m["k"] / m["seconds"] for m in matmuls))


def fit_matmul_efficiency(matmuls: list[dict], peak_flops_per_s: float) -> float:
    flops = sum(2 * m["m"] * m["n"] * m["k"] for m in matmuls)
    return min(flops / (sum(m["seconds"] for m in matmuls) * peak_flops_per_s), 1.0)


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


def _split_model(plan, backend: Backend) -> tuple[float, float]:
    """(seconds the model already explains apart from memory traffic: matmuls and exposed
    collectives; memory-bound bytes) of one step: with a memory bandwidth of 1 B/s the
    elementwise and optimizer terms read as bytes."""
    bare = dataclasses.replace(backend, overheads=Overheads(), memory_efficiency=1.0)
    fast = dataclasses.replace(bare, device=dataclasses.replace(backend.device, memory_bandwidth_Bps=1e30))
    slow = dataclasses.replace(bare, device=dataclasses.replace(backend.device, memory_bandwidth_Bps=1.0))
    timed, quick = step_time(plan, slow), step_time(plan, fast)
    return quick.compute_s + quick.a2a_s + quick.exposed_allreduce_s, timed.elementwise_s + timed.optimizer_s


def fit_overheads(block_seconds: dict[str, float], backend: Backend, plans: dict) -> tuple[Overheads, float, float, list[dict]]:
    """(overheads, memory bandwidth, its median relative error, block records).

    Residual = measured - (matmul + exposed collective) time. Dense models (1 and 3 blocks, two sizes) give, by least
    squares, residual = step_s + n * dense_layer_s + bytes / bandwidth; the MoE models, each
    minus that, give each router's block and (4 vs 8 experts) the per-expert cost."""
    split = {name: _split_model(plan, backend) for name, plan in plans.items()}
    resid = {name: block_seconds[name] - split[name][0] for name in plans}
    dense = [name for name in plans if name.startswith("dense")]
    micro = {name: plans[name].parallel.grad_accum for name in plans}
    # residual = micro * (step + n * dense_layer) + optimizer_step + bytes / bandwidth
    rows = np.array([[micro[name], 1.0, micro[name] * float(name[5]), split[name][1]] for name in dense])
    target = np.array([resid[name] for name in dense])
    weights = 1 / target.clip(min=1e-6)  # relative error
    solution, *_ = np.linalg.lstsq(rows * weights[:, None], target * weights, rcond=None)
    step, optimizer_step, dense_layer, inv_bw = (max(float(v), 0.0) for v in solution)
    inv_bw = max(inv_bw, 1e-13)
    error = float(np.median(np.abs(rows @ np.array([step, optimizer_step, dense_layer, inv_bw]) / target - 1)))

    def rest(name: str) -> float:  # what an MoE model's residual leaves for its MoE block
        return resid[name] - step - optimizer_step - dense_layer - split[name][1] * inv_bw

    local_expert = max(statistics.mean((rest(f"moe_topk_e8@{s}") - rest(f"moe_topk_e4@{s}")) / 4 for s in BLOCK_SEQ), 0.0)
    moe_layer = {r: max(statistics.mean(rest(f"moe_{r}_e4@{s}") for s in BLOCK_SEQ) - 4 * local_expert, 0.0) for r in ROUTER_NAMES}
    a2a_call = 0.0
    if "moe_topk_e4_ep2@s" in plans:  # ep 2 holds 2 experts instead of 4, and adds 4 all-to-all calls
        a2a_call = statistics.mean((rest(f"moe_topk_e4_ep2@{s}") - rest(f"moe_topk_e4@{s}") + 2 * local_expert) / A2A_CALLS_PER_LAYER
                                   for s in BLOCK_SEQ)  # fmt: skip
        a2a_call = max(a2a_call, 0.0)
    blocks = [{"name": name, "seconds": block_seconds[name], "modelled_s": split[name][0] + split[name][1] * inv_bw} for name in plans]
    overheads = Overheads(step_s=step, optimizer_step_s=optimizer_step, dense_layer_s=dense_layer, moe_layer_s=moe_layer,
                          local_expert_s=float(local_expert), a2a_call_s=float(a2a_call))  # fmt: skip
    return overheads, 1.0 / inv_bw, error, blocks


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
    }


def calibrate_rank(backend: Backend, *, device: torch.device, world: int, quick: bool = False) -> dict | None:
    """Run every micro-benchmark on this rank (all ranks at once); rank 0 returns the
    calibration document, the others None."""
    import torch.distributed as dist

    from moespec.profiling import microbench

    repeats = 5 if quick else 20
    matmuls = microbench.time_matmuls(microbench.matmul_shapes(), device, repeats=repeats)
    dtype_peak = fit_peak(matmuls, backend.device.peak_flops_per_s["fp32"])
    memory = microbench.time_memory(device, repeats=repeats)
    a2a, allreduce = microbench.time_collectives(device, repeats=max(repeats // 2, 3)) if world > 1 else ([], [])
    efficiency = fit_matmul_efficiency(matmuls, dtype_peak)
    if world > 1:
        link, link_error, allreduce_scale, allreduce_error = fit_link(backend, world, a2a, allreduce)
    else:  # nothing to measure between ranks: the backend's own link stands
        link, link_error, allreduce_scale, allreduce_error = backend.intra_node, 0.0, backend.allreduce_scale, 0.0
    scale = dtype_peak / backend.device.peak_flops_per_s["fp32"]
    peaks = {dtype: value * scale for dtype, value in backend.device.peak_flops_per_s.items()}
    # What is fitted so far; fit_overheads fits the memory bandwidth itself.
    partial = dataclasses.replace(
        backend, matmul_efficiency=efficiency, intra_node=link, allreduce_scale=allreduce_scale,
        device=dataclasses.replace(backend.device, peak_flops_per_s=peaks),
    )  # fmt: skip
    plans = block_plans(world)
    steps = 8 if quick else 30
    contexts = {}  # one process-group layout per (dp, ep), shared by the plans that use it
    seconds = {}
    for name, plan in plans.items():
        layout = (plan.parallel.dp, plan.parallel.ep)
        if world > 1 and layout not in contexts:
            from moespec.distributed.context import init_distributed

            contexts[layout] = init_distributed(plan, device=device.type)
        seconds[name] = microbench.time_training_step(plan, device, steps=steps, dist_ctx=contexts.get(layout))
    overheads, bandwidth, memory_error, blocks = fit_overheads(seconds, partial, plans)
    if world > 1 and dist.get_rank() != 0:
        return None
    flops = [2 * m["m"] * m["n"] * m["k"] for m in matmuls]
    matmul_error = statistics.median(abs(f / (dtype_peak * efficiency) / m["seconds"] - 1) for f, m in zip(flops, matmuls))
    document = {
        "version": 1,
        "backend": backend.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(device, world),
        "fitted": {
            "peak_flops_per_s": peaks,
            "matmul_efficiency": efficiency,
            "memory_bandwidth_Bps": bandwidth,
            "link": {"latency_s": link.latency_s, "bandwidth_Bps": link.effective_bandwidth_Bps},
            "allreduce_scale": allreduce_scale,
            "overhead": overheads.as_dict(),
        },
        "measurements": {"matmul": matmuls, "memory": memory, "all_to_all": a2a, "all_reduce": allreduce, "blocks": blocks},
        "fit_error": {"matmul": matmul_error, "memory": memory_error, "all_to_all": link_error, "all_reduce": allreduce_error},
    }
    document["fit_error"]["step"] = step_error(document, backend)
    return document


def step_error(calibration: dict, backend: Backend) -> float:
    """Median relative error of the calibrated model's whole-step prediction over the small
    models it was fitted on: the error band `profile` judges its time rows by."""
    from moespec.sim.calibration import apply_calibration

    calibrated = apply_calibration(backend, calibration)
    plans = block_plans(calibration["machine"]["nproc"])
    errors = [abs(step_time(plans[b["name"]], calibrated).step_s / b["seconds"] - 1)
              for b in calibration["measurements"]["blocks"] if b["name"] in plans]  # fmt: skip
    return statistics.median(errors)
