"""`moespec calibrate --backend NAME [--nproc N]`: fit the backend's figures to this machine
and write profiler/calibrations/<backend>.json (or --out), which `simulate --calibration` and
`profile` apply. The work is `moespec.profiling.calibrate`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from moespec.cli.common import backend_or_exit, console, emit_json, fail, writable_file_or_exit, write_atomic


def calibrate_command(
    backend: str = typer.Option(..., "--backend", help="Backend to calibrate (name or file).", show_default=False),
    nproc: int = typer.Option(1, "--nproc", help="Ranks that run the micro-benchmarks at once (collectives need 2 or more)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    out: Path = typer.Option(None, "--out", help="Calibration file to write [default: profiler/calibrations/<backend>.json, or <backend>.nproc<N>.json when N is not the devices per node]."),
    threads: int = typer.Option(0, "--threads", help="Torch threads per rank; 0: cores / backend devices per node on CPU."),
    quick: bool = typer.Option(False, "--quick", help="Fewer repeats (tests, smoke runs); noisier figures."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds before a stuck collective fails every rank."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as one JSON document on stdout."),
) -> None:
    """Micro-benchmark this machine and fit the backend's efficiencies, link and host overheads."""
    from moespec.malloc_tuning import keep_freed_memory

    keep_freed_memory()  # every step reuses its buffers instead of page-faulting fresh ones
    from moespec.distributed.context import launched_world

    hardware = backend_or_exit(backend)
    if device not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {device!r}")
    if not (1 <= nproc <= 1024 and 0 <= threads <= 1024 and 1 <= timeout <= 7 * 86400):
        fail("--nproc must be in [1, 1024], --threads in [0, 1024] and --timeout between 1 s and a week")
    if nproc > hardware.num_devices:
        fail(f"--nproc {nproc} is more ranks than backend {hardware.name} has devices ({hardware.num_devices})")
    if out is None:
        from moespec.sim.calibration import calibration_name, user_calibrations_dir

        out = user_calibrations_dir() / calibration_name(hardware.name, nproc, hardware.devices_per_node)
    if launched_world() is None:
        writable_file_or_exit(out, "--out")
    if nproc > 1 and launched_world() is None:
        from moespec.distributed.launch import launch

        args = ["calibrate", "--backend", backend, "--device", device, "--out", str(out), "--threads", str(threads),
                "--timeout", str(timeout)] + (["--quick"] if quick else []) + (["--json"] if as_json else [])  # fmt: skip
        code, failure = launch(nproc, args, timeout_s=timeout * 4 + 900)
        if failure:
            fail(failure, code=1)
        if code:
            raise typer.Exit(code)
        return
    if launched_world() is not None:
        from moespec.distributed.launch import run_rank

        run_rank(lambda: _calibrate(hardware, device, out, threads, quick, as_json, timeout, launched_world()))
        return
    _calibrate(hardware, device, out, threads, quick, as_json, timeout, 1)


def _calibrate(hardware, device: str, out: Path, threads: int, quick: bool, as_json: bool, timeout: float, world: int) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from moespec.cli.profile_cmd import default_threads
    from moespec.profiling.calibrate import calibrate_rank
    from moespec.sim.calibration import calibration_errors

    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: torch sees no CUDA device here; use --device cpu")
    torch.set_num_threads(threads or default_threads(hardware, device, world))
    torch_device = torch.device("cpu")
    if world > 1:
        import os

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            torch_device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    elif device == "cuda":
        torch_device = torch.device("cuda", 0)
    document = calibrate_rank(hardware, device=torch_device, world=world, quick=quick)
    if world > 1:
        dist.destroy_process_group()
    if document is None:
        return
    errors = calibration_errors(document, str(out))
    if errors:  # our own output must satisfy our schema; say so rather than write a bad file
        fail(f"internal error: the calibration does not validate: {errors[0].format()}", code=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(document, indent=2) + "\n")
    if as_json:
        emit_json(document | {"written": str(out)})
        return
    _print(document, out)


def _print(document: dict, out: Path) -> None:
    from moespec.sim.opdb import database_from_dict

    fitted, machine, errors, ops = document["fitted"], document["machine"], document["fit_error"], document["ops"]
    features = f" {' '.join(machine['cpu_features'])}," if machine.get("cpu_features") else ""
    console.print(f"[bold]{document['backend']}[/bold] calibrated on {machine['hostname']} ({machine['cpu']},{features} {machine['nproc']} rank(s) x "
                  f"{machine['threads_per_rank']} thread(s), torch {machine['torch']}) at {document['created']}")  # fmt: skip
    db = database_from_dict(ops)
    table = Table(title="operator database (measured; op_s fitted)")
    table.add_column("op family")
    table.add_column("figure", justify="right")
    for dtype, code in (("fp32", 0), ("bf16", 1)):
        if dtype in ops["linear"]:
            rates = [6 * m * k * n / db.linear_s(code, m, k, n)[()] / 1e9 for m, k, n in ((64, 256, 256), (1024, 1024, 1024))]
            table.add_row(f"Linear fwd+bwd, {dtype}", f"{rates[0]:,.1f} GFLOP/s at 64x256x256, {rates[1]:,.1f} at 1024^3")
    for dtype, code in (("fp32", 0), ("bf16", 1)):
        if dtype in ops["bmm"]:
            rate = 6 * 32 * 16 * 256 * 256 / db.bmm_s(code, 32, 16, 256, 256)[()] / 1e9
            table.add_row(f"expert bank bmm fwd+bwd, {dtype}", f"{rate:,.1f} GFLOP/s at 32 experts x 16 rows x 256^2")
    for dtype, code in (("fp32", 0), ("bf16", 1)):
        if dtype in ops["attention"]:
            rate = 12 * 256**2 * 64 * 16 / db.attention_s(code, 16, 256, 64)[()] / 1e9
            table.add_row(f"causal attention fwd+bwd, {dtype}", f"{rate:,.1f} GFLOP/s at 16 heads x 256 x 64")
    table.add_row("host time per op (fitted)", f"{ops['op_s'] * 1e6:,.2f} us")
    table.add_row("host time per optimizer step (fitted)", f"{ops['step_s'] * 1e3:,.3f} ms")
    for dtype, code in (("fp32", 0), ("bf16", 1)):
        if dtype in ops["grouped"]:
            rate = 18 * 64 * 128 * 128 * 8 / db.grouped_s(code, 8, 64, 128, 128)[()] / 1e9
            table.add_row(f"dropless expert groups fwd+bwd, {dtype}", f"{rate:,.1f} GFLOP/s at 8 groups x 64 rows x 128^2")
    per_param = ", ".join(f"{seconds / size * 1e9:,.2f} ns at {size:,}" for size, seconds in
                          zip(ops["optimizer_param_s"]["axes"]["size"], ops["optimizer_param_s"]["seconds"]))  # fmt: skip
    table.add_row("clip + AdamW: per op / per parameter by tensor size", f"{ops['optimizer_op_s'] * 1e6:,.2f} us / {per_param}")
    table.add_row("elementwise bandwidth", f"{ops['bandwidth_Bps'] / 1e9:,.2f} GB/s")
    table.add_row("gather / index_add bandwidth", f"{ops['gather_Bps'] / 1e9:,.2f} GB/s")
    link = fitted["link"]
    if document["measurements"]["all_to_all"]:
        table.add_row("link latency", f"{link['latency_s'] * 1e6:,.1f} us (fit error {errors['all_to_all']:.1%})")
        table.add_row("link bandwidth", f"{link['bandwidth_Bps'] / 1e9:,.2f} GB/s")
        table.add_row("wait per all-to-all call (fitted, ep 2 toy block)", f"{ops['a2a_call_s'] * 1e3:,.3f} ms")
        table.add_row("host time per tensor-parallel collective (fitted, tp 2 toy model)", f"{ops.get('tp_call_s', 0.0) * 1e3:,.3f} ms")
        table.add_row("schedule time per micro-batch and stage (fitted, pp 2 toy model)", f"{ops.get('pp_micro_s', 0.0) * 1e3:,.3f} ms")
        table.add_row("all-reduce over the ideal ring", f"{fitted['allreduce_scale']:.2f}x (fit error {errors['all_reduce']:.1%})")
    console.print(table)
    fit = ", ".join(f"{b['name']} {b['seconds'] * 1e3:,.1f} ms ({b['modelled_s'] / b['seconds'] - 1:+.0%})" for b in document["measurements"]["blocks"])
    console.print(f"fit models (measured, prediction's error): {fit}")
    console.print(f"median error {errors['step']:.1%} (profile calls a time within twice this, at least 5%, within the calibrated error)")
    console.print(f"written: {out}")
