"""Run a moespec command in the test's own process, as a CompletedProcess: a fresh interpreter
per call only pays torch's import again (about 4 s on CI's 2 cores). Commands that launch
ranks stay subprocesses: the ranks write to the real stdout."""

from __future__ import annotations

import subprocess

from typer.testing import CliRunner

from moespec.cli.app import app


def run_here(*args) -> subprocess.CompletedProcess:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback in the command: fail the test with it
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)
