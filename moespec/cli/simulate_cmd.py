"""`moespec simulate SPEC --backend NAME|FILE`: predict one training step before training."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moespec.cli.common import backend_or_exit, console, emit_json, fail, load_plan_or_exit
from moespec.cli.overrides import apply_overrides


def simulate_command(
    spec: Path = typer.Argument(..., help="Spec file.", show_default=False),
    backend: str = typer.Option(..., "--backend", help="Shipped backend name (e.g. dgx-h100) or a backend YAML file.", show_default=False),
    world: int = typer.Option(0, "--world", help="Devices to use: sets dp = world / (tp * pp); 0 keeps the spec's."),
    ep: int = typer.Option(0, "--ep", help="Expert-parallel degree to use instead of the spec's (0 keeps it)."),
    overlap: float = typer.Option(0.5, "--overlap", help="Share of the gradient all-reduce hidden behind backward (0..1)."),
    imbalance: float = typer.Option(1.0, "--imbalance", help="Dropless routing: busiest rank's load over the mean (>= 1)."),
    load: Path = typer.Option(None, "--load", help="A `moespec profile` report.json: predict with the expert loads it measured.", show_default=False),
    skew: float = typer.Option(None, "--skew", help="Zipf skew of expert loads: expert i gets a share ~ 1/(i+1)^S (0: balanced).", show_default=False),
    calibration: str = typer.Option("auto", "--calibration", help="auto (the shipped calibration of this backend for the spec's world, if any), none (the roofline) or a calibration JSON file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Predict parameters, FLOPs, memory per device, all-to-all and step time of one training step."""
    from moespec.sim.load import measured_load, zipf_load
    from moespec.sim.model import simulate

    plan = load_plan_or_exit(spec)
    if not 0 <= overlap <= 1:
        fail(f"--overlap must be between 0 and 1, got {overlap}")
    if not 1 <= imbalance <= 1000:
        fail(f"--imbalance is max/mean load, from 1 to 1000 (as in a sweep); got {imbalance}")
    if sum(x is not None for x in (load, skew)) + (imbalance != 1.0) > 1:
        fail("give one load model: --imbalance, --skew or --load")
    plan = apply_overrides(spec, plan, world=world, ep=ep)
    hardware = backend_or_exit(backend, calibration, world=plan.parallel.world)
    try:
        load_model = None
        if load is not None:
            load_model = measured_load(plan, load)
        elif skew is not None:
            load_model = zipf_load(plan, skew)
        report = simulate(plan, hardware, overlap=overlap, imbalance=imbalance, load=load_model)
    except ValueError as exc:
        fail(f"{spec}: {exc}")
    if as_json:
        emit_json(report)
        return
    _print(report)


def _gib(value: float) -> str:
    return f"{value / 2**30:,.2f} GiB"


def _print(report: dict) -> None:
    params, mem, time = report["params"], report["memory_per_device"], report["time"]
    calibrated = report["assumptions"]["calibration"]
    console.print(f"[bold]{report['spec']}[/bold] on {report['backend']}{' (calibrated: ' + calibrated + ')' if calibrated else ''} ({report['world']} devices: dp {report['dp']}, ep {report['ep']}"
                  f"{', tp ' + str(report['tp']) if report['tp'] > 1 else ''}{', pp ' + str(report['pp']) if report['pp'] > 1 else ''}, "
                  f"global batch {report['global_batch']})")  # fmt: skip
    staged = report["pp"] > 1  # per-rank rows: the pipeline rank with the most (sim/stages.py)
    counts = Table(title="counts (exact: equal to the compiled model" + ("; per rank: the pipeline rank with the most)" if staged else ")"))
    counts.add_column("figure")
    counts.add_column("value", justify="right")
    counts.add_row("parameters, total", f"{params['total']:,}")
    counts.add_row("parameters, active per token (embeddings included)", f"{params['active']:,}")
    counts.add_row("matmul FLOPs per rank per micro-step (fwd + bwd)", f"{report['step_flops_per_rank_microstep']:,}")
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):  # tensor parallelism's (sequence parallelism: all three)
        if report[f"tp_{kind}_calls_per_rank_microstep"]:
            counts.add_row(f"tensor-parallel {kind.replace('_', '-')}s per rank per micro-step", f"{report[f'tp_{kind}_calls_per_rank_microstep']:,}")
            counts.add_row("  their bytes per rank per micro-step" + (" (each rank's slice)" if kind == "all_gather" else ""),
                           f"{report[f'tp_{kind}_bytes_per_rank_microstep']:,}")  # fmt: skip
    if staged:
        counts.add_row(f"pipeline stages ({report['pipeline']['schedule']}), blocks", ", ".join(f"{lo}-{hi - 1}" for lo, hi in report["pipeline"]["stages"]))
    counts.add_row("all-to-all bytes sent per rank per micro-step", f"{report['a2a_bytes_per_rank_microstep']:,}")
    if report["shuffle_a2a_bytes_per_rank_microstep"]:
        counts.add_row("  BASE token shuffle, bytes per rank per micro-step", f"{report['shuffle_a2a_bytes_per_rank_microstep']:,}")
    for kind, label in (("params", "parameters"), ("grads", "gradients"), ("optimizer", "optimizer state")):
        counts.add_row(f"{label} held per rank (bytes, ZeRO-sharded)", f"{report['state_bytes_per_rank'][kind]:,}")
    counts.add_row("model FLOPs per token (for MFU)", f"{time['model_flops_per_token']:,.0f}")
    console.print(counts)
    memory = Table(title="memory per device (model)")
    memory.add_column("part")
    memory.add_column("bytes", justify="right")
    labels = {"activations": "activations (kept for backward)", "a2a_buffers": "a2a buffers (transient)",
              "total": "peak (tensors)", "allowance": "allocator allowance (for fits)"}  # fmt: skip
    for key in ("weights", "gathered_weights", "grads", "optimizer", "activations", "a2a_buffers", "total", "allowance"):
        memory.add_row(labels.get(key, key.replace("_", " ")), _gib(mem[f"{key}_bytes"]))
    verdict = "fits" if mem["fits"] else "[red]does NOT fit[/red]"
    memory.add_row("device", f"{_gib(mem['device_bytes'])} ({verdict})")
    console.print(memory)
    database = report["assumptions"]["time_model"].startswith("operator database")
    timing = Table(title="one optimizer step (model: " + ("operator database" if database else "roofline") + ")")
    timing.add_column("component")
    timing.add_column("time", justify="right")
    compute = "matmuls + attention (measured ops)" if database else "compute (matmul roofline)"
    host = "host time of the other ops" if database else "host overhead (calibrated)"
    for key, label in (("compute_s", compute), ("elementwise_s", "elementwise (memory-bound)"),
                       ("overhead_s", host), ("a2a_s", "all-to-all (exposed)"),
                       ("tp_comm_s", "tensor-parallel collectives"), ("pp_comm_s", "pipeline sends"),
                       ("dp_allreduce_s", "gradient all-reduce"), ("zero_comm_s", "ZeRO gathers and reduce-scatters"),
                       ("exposed_allreduce_s", "  data-parallel traffic exposed"),
                       ("bubble_s", "pipeline bubble"), ("optimizer_s", "optimizer"), ("step_s", "step")):  # fmt: skip
        timing.add_row(label, f"{time[key] * 1e3:,.2f} ms")
    console.print(timing)
    parts = Table(title="compute by part (split by share of matmul FLOPs)")
    parts.add_column("part")
    parts.add_column("FLOPs", justify="right")
    parts.add_column("time", justify="right")
    total = sum(report["step_flops_by_part"].values())
    for name, flops in sorted(report["step_flops_by_part"].items(), key=lambda item: -item[1]):
        parts.add_row(name.replace("_", " "), f"{flops / total:.1%}", f"{report['compute_s_by_part'][name] * 1e3:,.2f} ms")
    console.print(parts)
    console.print(f"tokens/s {time['tokens_per_s']:,.0f}   MFU {time['mfu']:.1%}")
    if "base_auction" in report["assumptions"]:
        console.print(f"note: {report['assumptions']['base_auction']}")
    if "load" in report:
        load = report["load"]
        console.print(f"load: {load['source']}; busiest rank's expert rows {load['compute_imbalance']:.2f}x the mean, "
                      f"its all-to-all rows {load['a2a_imbalance']:.2f}x balanced")  # fmt: skip
        console.print("all-to-all bytes per rank per micro-step: " + ", ".join(f"{v:,.0f}" for v in load["a2a_bytes_per_rank_microstep"]))
        dropped = {layer: v["dropped_fraction"] for layer, v in load["layers"].items() if v["dropped_fraction"]}
        if dropped:
            console.print("predicted dropped share by layer: " + ", ".join(f"{k}: {v:.1%}" for k, v in dropped.items()))
