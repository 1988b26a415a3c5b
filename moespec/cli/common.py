"""What every command shares: one-line errors with exit code 2, JSON output, atomic writes."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

BAD_INPUT_EXIT = 2

# Rich views go to stdout; errors to stderr, so `--json` keeps stdout one document.
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, *, code: int = BAD_INPUT_EXIT) -> NoReturn:
    """Print one line (no traceback) and exit; bad input exits 2."""
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def emit_json(document: Any) -> None:
    """One JSON document on stdout, and nothing else there."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temp file beside `path`, then rename: no partial file is ever left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_plan_or_exit(path: Path):
    """Load and resolve a spec, or print its errors (one line each) and exit 2."""
    from moespec.spec import SpecErrors, load_plan

    try:
        return load_plan(path)
    except SpecErrors as errors:
        for error in errors.errors:
            err_console.print(error.format(), markup=False, soft_wrap=True)
        raise typer.Exit(BAD_INPUT_EXIT)
