"""What every command shares: one-line errors with exit code 2, JSON output, atomic writes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import typer
from rich.console import Console

from moespec.files import write_atomic  # noqa: F401 - re-exported for the commands

BAD_INPUT_EXIT = 2
T = TypeVar("T")

# Rich views go to stdout; errors to stderr, so `--json` keeps stdout one document.
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, *, code: int = BAD_INPUT_EXIT) -> NoReturn:
    """Print one line (no traceback) and exit; bad input exits 2."""
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def emit_json(document: Any) -> None:
    """One JSON document on stdout, and nothing else there. JSON has no Infinity or NaN: such
    a figure (extreme backend values overflow) is written null, and the document's
    `non_finite` lists where, so a reader is told rather than handed invalid JSON."""
    try:  # the common case, every figure finite: one serialisation (explore's fronts are large)
        text = json.dumps(document, indent=2, default=_json_default, allow_nan=False)
    except ValueError:  # a non-finite float somewhere: find and null it
        bad: list[str] = []
        clean = _finite(json.loads(json.dumps(document, default=_json_default)), "", bad)
        if isinstance(clean, dict):
            clean["non_finite"] = {"paths": bad, "reason": "these figures overflowed (inf or nan) and are written null"}
        text = json.dumps(clean, indent=2, sort_keys=False, allow_nan=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _finite(value: Any, path: str, bad: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(path or "(root)")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), bad) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v, f"{path}[{i}]", bad) for i, v in enumerate(value)]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def or_exit(load: Callable[..., T], *args, **kwargs) -> T:
    """`load(*args, **kwargs)`, or its errors printed one line each and exit 2: SpecErrors
    (located lines) and ValueError (one line)."""
    from moespec.spec import SpecErrors

    try:
        return load(*args, **kwargs)
    except SpecErrors as errors:
        for error in errors.errors:
            err_console.print(error.format(), markup=False, soft_wrap=True)
        raise typer.Exit(BAD_INPUT_EXIT)
    except ValueError as exc:
        fail(str(exc))


def load_plan_or_exit(path: Path):
    """Load and resolve a spec, or print its errors (one line each) and exit 2."""
    from moespec.spec import load_plan

    return or_exit(load_plan, path)


def backend_or_exit(name: str, calibration: str = "none", *, world: int | None = None):
    """A backend by name or file, with a calibration (none, auto or a file) applied."""
    from moespec.sim.backend import load_backend
    from moespec.sim.calibration import backend_with_calibration

    return or_exit(backend_with_calibration, or_exit(load_backend, name), calibration, world=world)


# A CPU step costs ~6 * params * tokens FLOPs; at 25M parameters and 512 tokens a step that is
# ~80 GFLOP, about a second on a laptop core: the most that still gives a curve (or a profile
# of repeated steps) in minutes.
CPU_PARAM_LIMIT = 25_000_000


def available_memory_bytes(device: str = "cpu") -> int | None:
    """What a new process can still allocate: MemAvailable of /proc/meminfo on the host, the
    free bytes of the current GPU for cuda; None where neither can be read."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def backend_with_room(backend, world: int):
    """`backend` with at least `world` devices on its one node: for per-device figures (memory,
    FLOPs per token) of a run wider than the description's machine, which they do not depend on."""
    import dataclasses

    if backend.num_devices >= world:
        return backend
    return dataclasses.replace(backend, nodes=1, devices_per_node=world, inter_node=None)


def trainable_counts_or_exit(spec: Path, plan, *, ranks_here: int, device: str = "cpu"):
    """The plan's parameter counts, or one line and exit 2 when one rank's training memory (the
    simulator's peak per device: weights, gradients, AdamW state, activations, all-to-all
    buffers) times the ranks on this machine is more than it has available. The limit is what
    memory allows, not a parameter count: ep and ZeRO stages lower the per-rank figure."""
    from moespec.model.build import build_model
    from moespec.model.counting import count_parameters
    from moespec.sim.backend import load_backend
    from moespec.sim.model import memory_per_device

    try:
        counts = count_parameters(build_model(plan, device="meta"), plan)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        fail(f"{spec}: cannot build the model: {one_line(exc)}")
    available = available_memory_bytes(device)
    if available is None:
        return counts
    per_rank = memory_per_device(plan, backend_with_room(load_backend("cpu-local"), plan.parallel.world)).total_bytes
    if per_rank * ranks_here > available:
        where = "this GPU" if device == "cuda" else "this machine"
        fail(f"{spec}: {plan.name} ({counts.total:,} parameters) needs ~{per_rank / 2**30:.1f} GiB per rank to train (weights, "
             f"gradients, AdamW state, activations: `moespec simulate` shows the parts) and {where} has {available / 2**30:.1f} GiB "
             f"free for {ranks_here} rank{'s' if ranks_here > 1 else ''}; raise parallel.ep or zero_stage, lower parallel.micro_batch (or --batch), or add machines")  # fmt: skip
    return counts


def writable_dir_or_exit(path: Path, flag: str) -> None:
    """Before any work: `path` is (or can be made) a folder this process can write into."""
    import os
    import tempfile

    if path.exists() and not path.is_dir():
        fail(f"{flag} {path} is a file; give a folder")
    probe = path
    while not probe.exists():  # the nearest existing ancestor is where the folder would be made
        probe = probe.parent
    if not probe.is_dir():
        fail(f"{flag} {path}: cannot write there ({probe} is not a folder)")
    try:  # a real write (permissions, read-only mounts, quotas), removed at once
        fd, tmp = tempfile.mkstemp(prefix=".moespec-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        fail(f"{flag} {path}: cannot write into {probe} ({exc.strerror or exc})")


def writable_file_or_exit(path: Path, flag: str) -> None:
    """Before any work: `path` names a file (not a folder) whose folder this process can write into."""
    if str(path) == "" or path.is_dir():
        fail(f"{flag} {path or repr('')} is a folder (or empty); give a file name")
    writable_dir_or_exit(path.parent, flag)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and message, whitespace collapsed."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def cpu_sized_counts_or_exit(spec: Path, plan, *, doing: str, instead: str):
    """The plan's parameter counts (built on the meta device), or one line and exit 2 when the
    model cannot be built or is too big to `doing` on a CPU."""
    from moespec.model.build import build_model
    from moespec.model.counting import count_parameters

    try:
        counts = count_parameters(build_model(plan, device="meta"), plan)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        fail(f"{spec}: cannot build the model: {one_line(exc)}")
    if counts.total > CPU_PARAM_LIMIT:
        fail(f"{spec}: {plan.name} has {counts.total:,} parameters, over the {CPU_PARAM_LIMIT:,} limit for {doing} on CPU; {instead}")
    return counts
