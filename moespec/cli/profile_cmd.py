"""`moespec profile SPEC`: run the compiled model for real, measure what the simulator
predicts, and print both side by side. The work is `moespec.profiling`; this module parses,
launches ranks the way `train` does, and prints."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import typer
from rich.table import Table

from moespec.cli.common import (backend_or_exit, backend_with_room, console, cpu_sized_counts_or_exit, emit_json, fail, load_plan_or_exit,
                                writable_dir_or_exit, write_atomic)
from moespec.cli.overrides import apply_overrides
from moespec.profiling.report import MIN_TIMED_STEPS


def profile_command(
    spec: Path = typer.Argument(..., help="Spec file.", show_default=False),
    nproc: int = typer.Option(1, "--nproc", help="Ranks to launch (torchrun-style); must equal the spec's world size."),
    device: str = typer.Option("cpu", "--device", help="cpu (gloo) or cuda (NCCL, one GPU per rank)."),
    steps: int = typer.Option(10, "--steps", help="Timed optimizer steps (at least 10: the report gives their median and spread)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed steps first."),
    trace_steps: int = typer.Option(2, "--trace-steps", help="Steps recorded by torch.profiler after the timed ones (0: no traces)."),
    out: Path = typer.Option(None, "--out", help="Directory for report.json and the plots [default: moespec-profile/<name>]."),
    trace_dir: Path = typer.Option(None, "--trace-dir", help="Directory for the TensorBoard traces [default: OUT/traces]."),
    backend: str = typer.Option("cpu-local", "--backend", help="Backend the prediction and the MFU use (name or file)."),
    calibration: str = typer.Option("auto", "--calibration", help="auto (the shipped calibration of the backend), none, or a calibration file."),
    world: int = typer.Option(0, "--world", help="Run on this many ranks instead of the spec's (sets dp); 0 keeps the spec's."),
    ep: int = typer.Option(0, "--ep", help="Expert-parallel degree instead of the spec's (0 keeps it)."),
    threads: int = typer.Option(0, "--threads", help="Torch threads per rank; 0: cores / backend devices per node on CPU."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and of the batches."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds before a stuck collective fails every rank."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    single_process: bool = typer.Option(False, "--single-process", help="Run a spec of world > 1 in one process: its data-parallel math (global_batch / micro_batch micro-batches per step), without ep or ZeRO; predicted as world 1."),
) -> None:
    """Measure real training steps (time, FLOPs, all-to-all, memory, expert load) beside the simulator's prediction."""
    from moespec.distributed.context import (DistributedConfigError, check_single_process, launched_world, single_process_note,
                                             single_process_plan)  # fmt: skip

    plan = apply_overrides(spec, load_plan_or_exit(spec), world=world, ep=ep)
    if device not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {device!r}")
    if not (1 <= nproc <= 1024 and 1 <= steps <= 10**6 and 0 <= warmup <= 10**6 and 0 <= trace_steps <= 1000
            and 0 <= threads <= 1024 and 1 <= timeout <= 7 * 86400 and 0 <= seed < 2**63):  # fmt: skip
        fail("--nproc must be in [1, 1024], --steps in [1, 1e6], --warmup in [0, 1e6], --trace-steps in [0, 1000], "
             "--threads in [0, 1024], --timeout between 1 s and a week, --seed in [0, 2**63)")
    if single_process and nproc > 1:
        fail(f"--single-process runs one process; it does not go with --nproc {nproc}")
    _check_runnable(spec, plan, device)
    note = None
    if launched_world() is None and nproc == 1:
        try:
            check_single_process(plan, single_process=single_process)
        except DistributedConfigError as exc:
            fail(f"{spec}: {exc}")
        if plan.parallel.world > 1:
            note = single_process_note(plan)
            plan = single_process_plan(plan)
    if steps < MIN_TIMED_STEPS:  # after the spec's own refusals, which say more
        fail(f"--steps {steps}: profile times at least {MIN_TIMED_STEPS} steps, to give their median and spread")
    # the ranks run here: a world wider than the described machine runs on its links
    hardware = backend_with_room(backend_or_exit(backend, calibration, world=plan.parallel.world), plan.parallel.world)
    out = out or Path("moespec-profile") / plan.name
    trace_dir = trace_dir or out / "traces"
    if launched_world() is None:
        writable_dir_or_exit(out, "--out")
        if trace_steps:
            writable_dir_or_exit(trace_dir, "--trace-dir")
    options = dict(nproc=nproc, device=device, steps=steps, warmup=warmup, trace_steps=trace_steps, out=out,
                   trace_dir=trace_dir, threads=threads, seed=seed, timeout=timeout, as_json=as_json)  # fmt: skip
    if launched_world() is None:
        with no_partial_traces(trace_dir):
            if nproc == 1:
                _profile_rank(spec, plan, hardware, distributed=False, note=note, **options)
            else:
                _launch(spec, plan, backend=backend, calibration=calibration, world=world, ep=ep, **options)
        return
    if launched_world() is not None:
        from moespec.distributed.launch import run_rank

        run_rank(lambda: _profile_rank(spec, plan, hardware, distributed=True, **options))


def _check_runnable(spec: Path, plan, device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: torch sees no CUDA device here (this torch build or machine has none); use --device cpu")
    if device == "cpu":
        cpu_sized_counts_or_exit(spec, plan, doing="profiling", instead="use --device cuda or a tiny spec")


class no_partial_traces:
    """A profile stopped midway (Ctrl-C, a failed rank, a scheduler's SIGTERM) writes no
    report, so the traces it already wrote are removed too: no half of a result is left."""

    def __init__(self, trace_dir: Path):
        self.trace_dir = trace_dir
        self.before: set[Path] = set()

    def __enter__(self):
        self.before = set(self.trace_dir.rglob("*")) if self.trace_dir.is_dir() else set()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        finished = kind is None or (kind is typer.Exit and getattr(exc, "exit_code", 1) == 0)
        if finished or not self.trace_dir.is_dir():
            return
        for path in sorted(set(self.trace_dir.rglob("*")) - self.before, reverse=True):  # files before their folders
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                pass


def _launch(spec: Path, plan, *, backend: str, calibration: str, world: int, ep: int, **o) -> None:
    from moespec.distributed.context import DistributedConfigError, check_world
    from moespec.distributed.launch import launch

    try:
        check_world(plan, o["nproc"])
    except DistributedConfigError as exc:
        fail(f"{spec}: {exc}")
    args = ["profile", str(spec), "--device", o["device"], "--steps", str(o["steps"]), "--warmup", str(o["warmup"]),
            "--trace-steps", str(o["trace_steps"]), "--out", str(o["out"]), "--trace-dir", str(o["trace_dir"]),
            "--backend", backend, "--calibration", calibration, "--world", str(world), "--ep", str(ep),
            "--threads", str(o["threads"]), "--seed", str(o["seed"]), "--timeout", str(o["timeout"])]  # fmt: skip
    if o["as_json"]:
        args.append("--json")
    code, failure = launch(o["nproc"], args, timeout_s=o["timeout"] * 4 + 30 * (o["steps"] + o["warmup"] + o["trace_steps"]) + 120)
    if failure:
        fail(failure, code=1)
    if code:
        raise typer.Exit(code)


def default_threads(hardware, device: str, nproc: int) -> int:
    """A CPU backend's device is some cores: give each rank its share of this machine's."""
    cores = os.cpu_count() or 1
    return max(1, cores // max(nproc, hardware.devices_per_node)) if device == "cpu" else max(1, cores // nproc)


def _profile_rank(spec: Path, plan, hardware, *, distributed: bool, nproc: int, device: str, steps: int, warmup: int, trace_steps: int,
                  out: Path, trace_dir: Path, threads: int, seed: int, timeout: float, as_json: bool, note: str | None = None) -> None:  # fmt: skip
    import torch
    import torch.distributed as dist

    from moespec.profiling.measure import measure_rank
    from moespec.profiling.plots import write_plots
    from moespec.profiling.report import build_report

    from moespec.malloc_tuning import keep_freed_memory

    keep_freed_memory()  # every step reuses its buffers instead of page-faulting fresh ones
    threads = threads or default_threads(hardware, device, nproc)
    torch.set_num_threads(threads)
    ctx = None
    if distributed:
        from moespec.distributed.context import DistributedConfigError, init_distributed

        try:
            ctx = init_distributed(plan, timeout_s=timeout, device=device)
        except DistributedConfigError as exc:
            fail(f"{spec}: {exc}")
        torch_device = ctx.device
    else:
        torch_device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    measurement = measure_rank(plan, device=torch_device, steps=steps, warmup=warmup, trace_dir=trace_dir if trace_steps else None,
                               trace_steps=trace_steps, seed=seed, dist_ctx=ctx).as_dict()  # fmt: skip
    ranks = [measurement]
    if ctx is not None:
        ranks = [None] * ctx.world
        dist.all_gather_object(ranks, measurement)
    if ctx is None or ctx.rank == 0:
        report = build_report(plan, hardware, ranks, spec=str(spec), device=device, steps=steps, warmup=warmup, threads=threads,
                              trace_dir=str(trace_dir) if trace_steps else None)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        report["single_process"] = note
        report["plots"] = [str(path) for path in write_plots(report, out)]
        report["report"] = str(out / "report.json")
        import json

        write_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
        if as_json:
            emit_json(report)
        else:
            print_report(report)
    if ctx is not None:
        from moespec.distributed.context import shutdown

        shutdown()


def _fmt(value: float | None, figure: str) -> str:
    if value is None:
        return "-"
    if "FLOPs" in figure or "bytes" in figure or " per rank per micro-step" in figure:  # counts
        return f"{value:,.0f}"
    if "MFU" in figure:
        return f"{value:.2%}"
    if "tokens" in figure:
        return f"{value:,.0f}"
    return f"{value * 1e3:,.2f} ms"


def _print_memory_by_category(report: dict) -> None:
    by_category = report["memory_by_category"]
    if not by_category["rows"]:
        console.print(f"memory by category: {by_category['source']}")
        return
    n_ranks = len(by_category["ranks"])
    table = Table(title="memory by category, MiB (MemTracker, one extra untimed step; max over ranks)")
    table.add_column("category")
    for rank in range(n_ranks if n_ranks > 1 else 0):
        table.add_column(f"rank {rank}", justify="right")
    for column in ("measured", "predicted", "error"):
        table.add_column(column, justify="right")
    for row in by_category["rows"]:
        if row["exact"]:
            error = "[green]equal[/green]" if row["equal"] else f"[red]differs by {row['predicted'] - row['measured']:,.0f} B[/red]"
        else:
            error = "-" if row["relative_error"] is None else f"{row['relative_error']:+.1%}"
        per_rank = [f"{b / 2**20:,.3f}" for b in row["per_rank"]] if n_ranks > 1 else []
        table.add_row(row["figure"], *per_rank, f"{row['measured'] / 2**20:,.3f}",
                      "-" if row["predicted"] is None else f"{row['predicted'] / 2**20:,.3f}", error)  # fmt: skip
    console.print(table)
    console.print("state read just before the optimizer step (AdamW's step counters left out, as the simulator does), the rest at the "
                  "tracked peak; the predicted total is the tensors' peak (sim/activations.py), without the allocator allowance `fits` adds; DDP's gradient buckets count as gradients (the "
                  "gradients are views of them); not tracked: gloo's buffers")  # fmt: skip


def print_report(report: dict) -> None:
    calibrated = report["calibration"] or "datasheet figures, not calibrated"
    if report.get("single_process"):
        console.print(report["single_process"])
    split = "".join(f", {key} {report[key]}" for key in ("tp", "pp") if report.get(key, 1) > 1)
    console.print(f"[bold]{report['name']}[/bold]: world {report['world']} (dp {report['dp']}, ep {report['ep']}{split}) on {report['device']}, "
                  f"{report['threads_per_rank']} thread(s) per rank, {report['steps']} timed steps after {report['warmup']} warm-up")  # fmt: skip
    band = report["calibrated_error_band"]
    console.print(f"prediction: backend {report['backend']} ({calibrated})"
                  + (f"; time rows within the calibrated error band of +/-{band:.0%} say ok, or noisy when the steps' spread is wider"
                     if band is not None else ""))  # fmt: skip
    table = Table(title="measured vs predicted (per rank per micro-step for counts)")
    for column, justify in (("figure", "left"), ("measured", "right"), ("predicted", "right"), ("error", "right")):
        table.add_column(column, justify=justify)
    for row in report["comparison"]:
        if row["exact"]:
            error = "[green]equal[/green]" if row["equal"] else f"[red]differs by {row['predicted'] - row['measured']:,.0f}[/red]"
        else:
            error = "-" if row["relative_error"] is None else f"{row['relative_error']:+.1%}"
            if row.get("verdict") == "noisy":
                error += f" [yellow]noisy: spread {report['measured']['step_s']['spread']:.0%} > band {band:.0%}[/yellow]"
            elif row.get("verdict") is not None:
                error += " ok" if row["verdict"] == "ok" else " [yellow]out[/yellow]"
        table.add_row(row["figure"].replace(" (s, median)", "").replace(" (s)", "").replace(", transfer + wait", " (+ wait)"), _fmt(row["measured"], row["figure"]),
                      _fmt(row["predicted"], row["figure"]), error)  # fmt: skip
    console.print(table)
    speed = report.get("machine_speed", {})
    if speed.get("vs_calibration") is not None:
        console.print(f"machine: the probe (a fixed fp32 Linear on one thread) ran at {speed['vs_calibration']:.2f}x its speed at calibration"
                      + (" [yellow]drifted: outside the band[/yellow] (a hint, not a cause: the probe has not tracked a step's speed well)"
                         if report.get("drifted") else ""))  # fmt: skip
    elif report["calibration"] and speed.get("probe_s") is not None:
        console.print("machine: the calibration holds no probe to compare this machine's speed with (calibrate again to get one)")
    if speed.get("same_cpu") is False:
        console.print(f"[yellow]machine: another kind of CPU than the calibration's[/yellow] (here {' '.join(speed['cpu_features'])}; "
                      f"calibrated on {' '.join(speed['calibration_cpu_features'])}): its rates do not hold here, calibrate on this machine")
    m = report["measured"]
    spread = m["step_s"]["spread"]
    console.print(f"step time over {report['steps']} steps: median {m['step_s']['median'] * 1e3:,.2f} ms, "
                  f"spread (interquartile range / median) {'-' if spread is None else f'{spread:.1%}'}, "
                  f"min {m['step_s']['min'] * 1e3:,.2f}, max {m['step_s']['max'] * 1e3:,.2f}"
                  + ("" if m["achieved_flops_per_s"] is None else f"; achieved {m['achieved_flops_per_s'] / 1e9:,.2f} GFLOP/s"))  # fmt: skip
    if len(report["ranks"]) > 1:
        per_rank = Table(title="per rank")
        memory_label = "CUDA peak" if report["measured"]["memory"]["kind"] == "cuda_peak_allocated" else "peak RSS"
        for column in ("rank", "median step", "FLOPs / micro-step", "a2a bytes / micro-step", "a2a (traced)", memory_label):
            per_rank.add_column(column, justify="right")
        for r in report["ranks"]:
            a2a_s = r["region_s"].get("dispatch_a2a", 0.0) + r["region_s"].get("combine_a2a", 0.0)
            per_rank.add_row(str(r["rank"]), f"{statistics.median(r['step_s']) * 1e3:,.2f} ms", "-" if r["flops_per_microstep"] is None else f"{r['flops_per_microstep']:,}",
                             f"{r['a2a_bytes_per_microstep']:,.0f}", f"{a2a_s * 1e3:,.2f} ms",
                             f"{r['peak_memory_bytes'] / 2**20:,.1f} MiB")  # fmt: skip
        console.print(per_rank)
    regions = Table(title="where the measured step went (profiled steps, scaled to the median)")
    regions.add_column("region")
    regions.add_column("ms", justify="right")
    regions.add_column("share", justify="right")
    total = sum(m["region_s"].values()) or 1.0
    for name, seconds in sorted(m["region_s"].items(), key=lambda item: -item[1]):
        regions.add_row(name.replace("_", " "), f"{seconds * 1e3:,.2f}", f"{seconds / total:.0%}")
    console.print(regions)
    _print_memory_by_category(report)
    memory = m["memory"]
    if memory["kind"] == "cuda_peak_allocated":
        console.print(f"CUDA peak allocated (timed steps): {memory['peak_bytes'] / 2**20:,.2f} MiB; "
                      f"predicted {memory['predicted_total_bytes'] / 2**20:,.2f} MiB")  # fmt: skip
    else:
        console.print(f"RSS (whole process: Python, torch, the corpus; not the simulator's quantity): peak {memory['peak_bytes'] / 2**20:,.1f} MiB, "
                      f"{memory['above_baseline_bytes'] / 2**20:,.1f} MiB above the process before the model")  # fmt: skip
    if m["expert_load"]:
        load = Table(title="expert load per MoE layer (tokens routed in the timed steps, all ranks)")
        for column in ("layer", "min", "mean", "max", "max/mean", "dropped"):
            load.add_column(column, justify="right")
        for layer, s in m["expert_load"].items():
            load.add_row(layer, f"{s['min']:,}", f"{s['mean']:,.1f}", f"{s['max']:,}", f"{s['max_over_mean']:.2f}", f"{s['dropped_fraction']:.1%}")
        console.print(load)
    console.print(f"report: {report['report']}; plots: {', '.join(report['plots'])}")
    if report["trace_dir"]:
        console.print(f"traces: tensorboard --logdir {report['trace_dir']}  (PyTorch Profiler tab, torch-tb-profiler)")
