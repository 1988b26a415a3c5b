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
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, NoReturn

RANK_FAILED = "moespec: rank {rank} failed: {what}"
_RANK_FAILED_RE = re.compile(r"moespec: rank (\d+) failed: (.*)")
_TORCHRUN_RANK_RE = re.compile(r"rank\s*:\s*(\d+)")
_TORCHRUN_EXIT_RE = re.compile(r"exitcode\s*:\s*(-?\d+).*?(\(SIG\w+\))?\s*$")
# What a rank says when a peer vanished: mid-run (closed or reset connections) or before gloo's
# full mesh was up (the peer's port refuses connections).
_PEER_LOST_RE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Connection refused|connectFullMesh failed|timed out connecting"
    r"|Broken pipe|remote worker crash|NCCL communicator was aborted",
    re.I,
)
# How torchrun's agent ends the ranks still running once one has failed.
_STOPPED_BY_AGENT = "killed by SIGTERM"
# A collective that gave up waiting (gloo's per-op timeout, NCCL's watchdog).
_TIMED_OUT_RE = re.compile(r"Timed out waiting|collective operation timeout|Watchdog caught", re.I)


def current_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_rank(body: Callable[[], object]) -> NoReturn:
    """Run one rank's work and end the process: on any exception print one line naming the
    rank, then exit 1 without waiting for peers (they are stopped by the agent or by the
    collective timeout); on success flush and exit 0 at once.

    Why a finished rank skips the interpreter's own exit: by then its work is written and its
    process groups destroyed (`context.shutdown`), and what the normal exit adds is C++ and
    Python finalization, where gloo's threads and the tensors their works still hold are torn
    down in no fixed order. That was seen to end a rank that had finished in std::terminate
    (SIGABRT, "terminate called without an active exception": `make test`, 2026-12-01, rank 2
    of a 4-rank pp 2 x ep 2 train, after the report was printed), and the run then failed."""
    try:
        body()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must name its rank
        what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        print(RANK_FAILED.format(rank=current_rank(), what=what), file=sys.stderr, flush=True)
        if os.environ.get("MOESPEC_TRACEBACK"):
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun_command(nproc: int, program_args: list[str], *, module: bool = True,
                     nodes: tuple[int, int, str] = (1, 0, "")) -> list[str]:  # fmt: skip
    """`module`: run `-m moespec <program_args>`; else program_args[0] is a script path.
    nodes (nnodes, node rank, HOST:PORT of node 0): one node rendezvous on a free local port;
    several meet at node 0's endpoint (static rendezvous, so rank r lives on node r // nproc)."""
    target = ["-m", "moespec", *program_args] if module else program_args
    nnodes, node_rank, endpoint = nodes
    rendezvous = ["--standalone"] if nnodes == 1 else [
        f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static", f"--rdzv-endpoint={endpoint}",
        f"--master-addr={endpoint.rpartition(':')[0]}", f"--master-port={endpoint.rpartition(':')[2]}",
    ]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run",
        *rendezvous,
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        "--monitor-interval=0.2",
        *target,
    ]  # fmt: skip


def launch(nproc: int, program_args: list[str], *, timeout_s: float, module: bool = True,
           nodes: tuple[int, int, str] = (1, 0, "")) -> tuple[int, str | None]:  # fmt: skip
    """Run `moespec <module_args>` on nproc local ranks; returns (exit code, failure line or None).

    Rank output streams through; torchrun's multi-line error report is condensed to the
    failing rank's own one-line message.
    """
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    env["PYTHONUNBUFFERED"] = "1"
    # A stop of this command (Ctrl-C, or a scheduler's SIGTERM/SIGHUP) ends the launcher and
    # every rank under it (`end_group`), never orphans one.
    proc = subprocess.Popen(torchrun_command(nproc, program_args, module=module, nodes=nodes), stdout=None,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)  # fmt: skip
    log = FailureLog(keep_tracebacks=bool(os.environ.get("MOESPEC_TRACEBACK")))
    threading.Thread(target=_end_after_failure, args=(proc, log), daemon=True).start()
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS if threading.current_thread() is threading.main_thread()}
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            if log.read(line):
                sys.stderr.write(line)
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        end_group(proc)
        return 1, f"distributed run did not finish within {timeout_s:.0f} s; all ranks were stopped"
    except KeyboardInterrupt:
        end_group(proc)
        raise
    except Stopped as stop:
        end_group(proc)
        name = signal.Signals(stop.signum).name
        return 128 + stop.signum, f"stopped by {name}: the launcher and all {nproc} local ranks were ended (nothing was reported)"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, log.verdict(code)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
FAILURE_GRACE_S = 5.0  # after a rank reports a failure, how long the others get to end on their own


def _end_after_failure(proc: subprocess.Popen, log: "FailureLog", grace_s: float = FAILURE_GRACE_S) -> None:
    """Once a rank has reported a failure, give the others `grace_s` to end, then note which
    ranks are still there (a stopped or hung rank answers nothing, and torchrun's agent would
    wait ~30 s more for it) and end the whole group."""
    first = None
    while proc.poll() is None:
        if log.failures and first is None:
            first = time.monotonic()
        if first is not None and time.monotonic() - first > grace_s:
            log.unresponsive = live_ranks(proc.pid)
            end_group(proc, grace_s=1.0)
            return
        time.sleep(0.2)


def live_ranks(launcher: int) -> dict[int, str]:
    """{rank: state} of the worker processes still under the launcher (Linux /proc): the rank
    from each worker's RANK, its state from /proc/PID/stat (T: stopped, S/R: running)."""
    found = {}
    for entry in map(str, descendants(launcher)):
        try:
            env = dict(item.split(b"=", 1) for item in open(f"/proc/{entry}/environ", "rb").read().split(b"\0") if b"=" in item)
            if b"LOCAL_RANK" not in env or b"RANK" not in env:
                continue  # torchrun's agent, not a worker
            stat = open(f"/proc/{entry}/stat").read()
            state = stat[stat.rindex(")") + 2]
            found[int(env[b"RANK"])] = {"T": "stopped", "t": "stopped", "Z": "exited"}.get(state, "running")
        except (OSError, ValueError):
            continue
    return found


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def end_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the launcher and every process under it (torchrun starts each rank in a
    session of its own, so its process group does not reach them), then SIGKILL to whatever
    is left after `grace_s`: a stopped (SIGSTOP) rank only ends by SIGKILL."""
    family = [proc.pid, *descendants(proc.pid)]  # before the launcher dies and its ranks are re-parented
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in family:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(pid) for pid in family):
            time.sleep(0.1)
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if not any(_alive(pid) for pid in family):
            return


def descendants(root: int) -> list[int]:
    """Every process under `root` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
                children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass
class FailureLog:
    """What the ranks and torchrun's agent said on stderr, read line by line, so that the run's
    failure can be told in one line naming the rank that caused it (not the ranks that merely
    lost it as a peer)."""

    keep_tracebacks: bool = False
    failures: list[tuple[int, str]] = field(default_factory=list)  # (rank, its one-line error)
    exits: dict[int, str] = field(default_factory=dict)  # rank -> how it ended, from torchrun's report
    root_cause_rank: int | None = None
    unresponsive: dict[int, str] = field(default_factory=dict)  # ranks still there after a failure (`_end_after_failure`)
    _report_rank: int | None = None
    _in_report: bool = False
    _in_root_cause: bool = False

    def read(self, line: str) -> bool:
        """Take one stderr line; True when it should be shown to the user."""
        match = _RANK_FAILED_RE.search(line)
        if match:
            self.failures.append((int(match.group(1)), match.group(2)))
            return True
        starts_report = "ChildFailedError" in line or line.startswith("=" * 20) or "Root Cause" in line
        if starts_report or (line.startswith("Traceback (most recent call last)") and not self.keep_tracebacks):
            self._in_report = True  # the agent's own traceback, then its report: condensed below
        if self._in_report:
            self._read_report(line)
            return False
        return not _is_launcher_noise(line)

    def _read_report(self, line: str) -> None:
        self._in_root_cause = self._in_root_cause or "Root Cause" in line
        found, exited = _TORCHRUN_RANK_RE.search(line), _TORCHRUN_EXIT_RE.search(line)
        if found:
            self._report_rank = int(found.group(1))
            if self._in_root_cause and self.root_cause_rank is None:
                self.root_cause_rank = self._report_rank
        if exited and self._report_rank is not None:
            code_text, signal_name = exited.group(1), exited.group(2)
            how = f"killed by {signal_name.strip('()')}" if signal_name else f"exit code {code_text}"
            self.exits.setdefault(self._report_rank, how)

    def verdict(self, code: int) -> str | None:
        """One line naming the failed rank, or None for a clean run."""
        if code == 0:
            return None
        reported = {rank for rank, _ in self.failures}
        only_peer_losses = all(_PEER_LOST_RE.search(what) for _, what in self.failures)
        silent = sorted(rank for rank in self.exits if rank not in reported)
        if silent and only_peer_losses:
            # A rank died without a word (killed, out of memory); the others only saw it go.
            # SIGTERM is how the agent stops the survivors, so such a rank is the cause last;
            # then torchrun's "first observed failure" (its clock ties within one poll).
            rank = min(silent, key=lambda r: (self.exits[r] == _STOPPED_BY_AGENT, r != self.root_cause_rank, r))
            seen = f"; rank(s) {', '.join(map(str, sorted(reported)))} lost their peer" if reported else ""
            return f"rank {rank} died ({self.exits[rank]}){seen}"
        if self.failures:
            # The root cause is the first failure that is not a peer's loss seen from another rank.
            causes = [f for f in self.failures if not _PEER_LOST_RE.search(f[1])] or self.failures
            rank, what = causes[0]
            others = sorted(reported - {rank})
            extra = f" (then rank(s) {', '.join(map(str, others))} stopped)" if others else ""
            stopped = sorted(r for r in silent if self.exits[r] == _STOPPED_BY_AGENT)
            hung = {r: state for r, state in self.unresponsive.items() if r not in reported}
            if _TIMED_OUT_RE.search(what) and hung:
                # Ranks still there after the others gave up: stopped (SIGSTOP, a debugger) or hung.
                told = ", ".join(f"{r} ({state})" for r, state in sorted(hung.items()))
                extra += f"; rank(s) {told} never answered: look there for the hang"
            elif _TIMED_OUT_RE.search(what) and stopped:
                # The rank that gave up waited for a peer that was alive and silent: a hang there.
                extra += f"; rank(s) {', '.join(map(str, stopped))} never joined: look there for the hang"
            return f"rank {rank} failed: {what}{extra}"
        if self.root_cause_rank is not None:
            return f"rank {self.root_cause_rank} exited with an error (exit code {code}) before reporting; rerun with MOESPEC_TRACEBACK=1"
        return f"distributed run failed with exit code {code}"


def _is_launcher_noise(line: str) -> bool:
    """torchrun's routine chatter: OMP_NUM_THREADS advice, agent shutdown messages."""
    if "moespec" in line:
        return False
    bare = line[1:] if line.startswith("[") else line
    glog_prefix = len(bare) > 5 and bare[0] in "WIE" and bare[1:5].isdigit()  # e.g. "W1122 04:50:01...", "[E1128 ..."
    gloo_retry = "gloo/transport" in line and "failed to connect" in line  # gloo's own connect retries
    return (
        glog_prefix
        or gloo_retry
        or "Setting OMP_NUM_THREADS" in line
        or line.startswith("*****")
        or "torch.distributed.elastic" in line
    )
