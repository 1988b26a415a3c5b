"""Launching ranks the torchrun way, and ending all of them cleanly when one fails.

`moespec train SPEC --nproc N` re-executes itself under `python -m torch.distributed.run
--standalone --nproc-per-node N -m moespec train SPEC ...`, so the same entry point works under
a user's own `torchrun --nnodes ... -m moespec train`. Torch's elastic agent watches the
workers: with --max-restarts 0, one rank's death stops the others at once. A rank that raises
prints one line naming itself before it exits; a rank stuck in a collective whose peer died
or hung gets gloo/NCCL's timeout error (init_process_group timeout) and does the same.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from typing import Callable, TypeVar

T = TypeVar("T")

RANK_FAILED = "moespec: rank {rank} failed: {what}"
_RANK_FAILED_RE = re.compile(r"moespec: rank (\d+) failed: (.*)")
_TORCHRUN_RANK_RE = re.compile(r"rank\s*:\s*(\d+)")
_TORCHRUN_EXIT_RE = re.compile(r"exitcode\s*:\s*(-?\d+).*?(\(SIG\w+\))?\s*$")
_PEER_LOST_RE = re.compile(r"Connection closed by peer|Connection reset by peer|remote worker crash|NCCL communicator was aborted", re.I)


def current_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_rank(body: Callable[[], T]) -> T:
    """Run one rank's work; on any exception print one line naming the rank, then exit 1
    without waiting for peers (they are stopped by the agent or by the collective timeout)."""
    try:
        return body()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must name its rank
        what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        print(RANK_FAILED.format(rank=current_rank(), what=what), file=sys.stderr, flush=True)
        if os.environ.get("MOESPEC_TRACEBACK"):
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def torchrun_command(nproc: int, program_args: list[str], *, module: bool = True) -> list[str]:
    """`module`: run `-m moespec <program_args>`; else program_args[0] is a script path."""
    target = ["-m", "moespec", *program_args] if module else program_args
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",  # local rendezvous on a free port: no fixed ports
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        "--monitor-interval=0.2",
        *target,
    ]  # fmt: skip


def launch(nproc: int, program_args: list[str], *, timeout_s: float, module: bool = True) -> tuple[int, str | None]:
    """Run `moespec <module_args>` on nproc local ranks; returns (exit code, failure line or None).

    Rank output streams through; torchrun's multi-line error report is condensed to the
    failing rank's own one-line message.
    """
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        torchrun_command(nproc, program_args, module=module), stdout=None, stderr=subprocess.PIPE, text=True, env=env
    )
    failures: list[tuple[int, str]] = []
    exits: dict[int, str] = {}  # rank -> how it ended, from torchrun's report
    root_cause_rank: int | None = None
    report_rank: int | None = None
    in_report = in_root_cause = False
    keep_tracebacks = bool(os.environ.get("MOESPEC_TRACEBACK"))
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            match = _RANK_FAILED_RE.search(line)
            if match:
                failures.append((int(match.group(1)), match.group(2)))
                sys.stderr.write(line)
                continue
            starts_report = "ChildFailedError" in line or line.startswith("=" * 20) or "Root Cause" in line
            if starts_report or (line.startswith("Traceback (most recent call last)") and not keep_tracebacks):
                in_report = True  # the agent's own traceback, then its report: condensed below
            if in_report:
                in_root_cause = in_root_cause or "Root Cause" in line
                found, exited = _TORCHRUN_RANK_RE.search(line), _TORCHRUN_EXIT_RE.search(line)
                if found:
                    report_rank = int(found.group(1))
                    if in_root_cause and root_cause_rank is None:
                        root_cause_rank = report_rank
                if exited and report_rank is not None:
                    code_text, signal_name = exited.group(1), exited.group(2)
                    exits.setdefault(report_rank, f"killed by {signal_name.strip('()')}" if signal_name else f"exit code {code_text}")
                continue
            if _is_launcher_noise(line):
                continue
            sys.stderr.write(line)
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return 1, f"distributed run did not finish within {timeout_s:.0f} s; all ranks were stopped"
    except KeyboardInterrupt:
        proc.terminate()
        raise
    if code == 0:
        return 0, None
    reported = {rank for rank, _ in failures}
    only_peer_losses = all(_PEER_LOST_RE.search(what) for _, what in failures)
    silent = sorted(rank for rank in exits if rank not in reported)
    if silent and only_peer_losses:
        # A rank died without a word (killed, out of memory); the others only saw it go.
        rank = root_cause_rank if root_cause_rank in silent else silent[0]
        seen = f"; rank(s) {', '.join(map(str, sorted(reported)))} lost their peer" if reported else ""
        return code, f"rank {rank} died ({exits[rank]}){seen}"
    if failures:
        # The root cause is the first failure that is not a peer's loss seen from another rank.
        causes = [f for f in failures if not _PEER_LOST_RE.search(f[1])] or failures
        rank, what = causes[0]
        others = sorted({r for r, _ in failures} - {rank})
        extra = f" (then rank(s) {', '.join(map(str, others))} stopped)" if others else ""
        return code, f"rank {rank} failed: {what}{extra}"
    if root_cause_rank is not None:
        return code, f"rank {root_cause_rank} exited with an error (exit code {code}) before reporting; rerun with MOESPEC_TRACEBACK=1"
    return code, f"distributed run failed with exit code {code}"


def _is_launcher_noise(line: str) -> bool:
    """torchrun's routine chatter: OMP_NUM_THREADS advice, agent shutdown messages."""
    if "moespec" in line:
        return False
    glog_prefix = len(line) > 5 and line[0] in "WIE" and line[1:5].isdigit()  # e.g. "W1122 04:50:01..."
    return (
        glog_prefix
        or "Setting OMP_NUM_THREADS" in line
        or line.startswith("*****")
        or "torch.distributed.elastic" in line
    )
