"""`moespec simulate SPEC --backend NAME|FILE`: predict one training step before training."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moespec.cli.common import console, emit_json, err_console, fail, load_plan_or_exit


def simulate_command(
    spec: Path = typer.Argument(..., help="Spec file.", show_default=False),
    backend: str = typer.Option(..., "--backend", help="Shipped backend name (e.g. dgx-h100) or a backend YAML file.", show_default=False),
    world: int = typer.Option(0, "--world", help="Devices to use: sets dp = world / (tp * pp); 0 keeps the spec's."),
    ep: int = typer.Option(0, "--ep", help="Expert-parallel degree to use instead of the spec's (0 keeps it)."),
    overlap: float = typer.Option(0.5, "--overlap", help="Share of the gradient all-reduce hidden behind backward (0..1)."),
    imbalance: float = typer.Option(1.0, "--imbalance", help="Dropless routing: busiest rank's load over the mean (>= 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Predict parameters, FLOPs, memory per device, all-to-all and step time of one training step."""
    from moespec.sim.backend import load_backend
    from moespec.sim.model import simulate
    from moespec.spec import SpecErrors

    plan = load_plan_or_exit(spec)
    if not 0 <= overlap <= 1:
        fail(f"--overlap must be between 0 and 1, got {overlap}")
    if not imbalance >= 1:
        fail(f"--imbalance is max/mean load, so at least 1; got {imbalance}")
    try:
        hardware = load_backend(backend)
    except SpecErrors as errors:
        for error in errors.errors:
            err_console.print(error.format(), markup=False, soft_wrap=True)
        raise typer.Exit(2)
    if ep:
        plan = _with_ep(plan, ep)
    if world:
        plan = _with_world(spec, plan, world)
    try:
        report = simulate(plan, hardware, overlap=overlap, imbalance=imbalance)
    except ValueError as exc:
        fail(f"{spec}: {exc}")
    if as_json:
        emit_json(report)
        return
    _print(report)


def _with_ep(plan, ep: int):
    import dataclasses

    counts = sorted({layer.moe.experts.count for layer in plan.moe_layers})
    if ep < 1 or any(count % ep for count in counts):
        fail(f"--ep ({ep}) must divide every MoE layer's expert count ({', '.join(map(str, counts)) or 'no MoE layers'})")
    return dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, ep=ep))


def _with_world(spec: Path, plan, world: int):
    """The same design on `world` devices: dp changes, ep and the micro-batch stay."""
    import dataclasses

    p = plan.parallel
    if world < 1 or world % (p.tp * p.pp):
        fail(f"--world ({world}) must be a positive multiple of tp * pp ({p.tp * p.pp})")
    dp = world // (p.tp * p.pp)
    if dp % p.ep:
        fail(f"--world {world} gives dp {dp}, which parallelism.ep ({p.ep}) does not divide; pick a multiple of {p.ep * p.tp * p.pp}")
    per_step = p.micro_batch * dp
    global_batch = max(p.global_batch // per_step, 1) * per_step
    return dataclasses.replace(plan, parallel=dataclasses.replace(p, dp=dp, global_batch=global_batch))


def _gib(value: float) -> str:
    return f"{value / 2**30:,.2f} GiB"


def _print(report: dict) -> None:
    params, mem, time = report["params"], report["memory_per_device"], report["time"]
    console.print(f"[bold]{report['spec']}[/bold] on {report['backend']} ({report['world']} devices: dp {report['dp']}, ep {report['ep']}, global batch {report['global_batch']})")
    counts = Table(title="counts (exact: equal to the compiled model)")
    counts.add_column("figure")
    counts.add_column("value", justify="right")
    counts.add_row("parameters, total", f"{params['total']:,}")
    counts.add_row("parameters, active per token (embeddings included)", f"{params['active']:,}")
    counts.add_row("matmul FLOPs per rank per micro-step (fwd + bwd)", f"{report['step_flops_per_rank_microstep']:,}")
    counts.add_row("all-to-all bytes sent per rank per micro-step", f"{report['a2a_bytes_per_rank_microstep']:,}")
    counts.add_row("model FLOPs per token (for MFU)", f"{time['model_flops_per_token']:,.0f}")
    console.print(counts)
    memory = Table(title="memory per device (model)")
    memory.add_column("part")
    memory.add_column("bytes", justify="right")
    for key in ("weights", "grads", "optimizer", "activations", "a2a_buffers", "allowance", "total"):
        memory.add_row(key.replace("_", " "), _gib(mem[f"{key}_bytes"]))
    verdict = "fits" if mem["fits"] else "[red]does NOT fit[/red]"
    memory.add_row("device", f"{_gib(mem['device_bytes'])} ({verdict})")
    console.print(memory)
    timing = Table(title="one optimizer step (model)")
    timing.add_column("component")
    timing.add_column("time", justify="right")
    for key, label in (("compute_s", "compute (roofline)"), ("a2a_s", "all-to-all (exposed)"),
                       ("dp_allreduce_s", "gradient all-reduce"), ("exposed_allreduce_s", "  of which exposed"),
                       ("bubble_s", "pipeline bubble"), ("optimizer_s", "optimizer"), ("step_s", "step")):  # fmt: skip
        timing.add_row(label, f"{time[key] * 1e3:,.2f} ms")
    console.print(timing)
    parts = Table(title="compute by part (share of matmul FLOPs)")
    parts.add_column("part")
    parts.add_column("FLOPs", justify="right")
    parts.add_column("time", justify="right")
    total = sum(report["step_flops_by_part"].values())
    for name, flops in sorted(report["step_flops_by_part"].items(), key=lambda item: -item[1]):
        parts.add_row(name.replace("_", " "), f"{flops / total:.1%}", f"{report['compute_s_by_part'][name] * 1e3:,.2f} ms")
    console.print(parts)
    console.print(f"tokens/s {time['tokens_per_s']:,.0f}   MFU {time['mfu']:.1%}")
