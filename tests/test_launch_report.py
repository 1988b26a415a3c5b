"""The launcher's one-line verdict, read from real stderr that torchrun and gloo printed.

tests/data/torchrun_peer_refused.txt is what a 2-core CI machine printed when rank 1 was
SIGKILLed before gloo's full mesh was up: rank 0 saw only a refused connection. The
process-level tests (test_profile, test_distributed) kill real ranks; this one pins the
timing they cannot choose. tests/data/torchrun_killed_while_starting.txt is torchrun's report
when rank 1 was SIGKILLed during its imports and the agent then stopped rank 0 with SIGTERM,
with the two entries in the order torchrun may print them when it sees both in one poll
(the run that printed it had them the other way round).
"""

import os
import subprocess
import sys
from pathlib import Path

from moespec.distributed.launch import FailureLog

DATA = Path(__file__).parent / "data"


def read_all(text: str) -> tuple[FailureLog, list[str]]:
    log = FailureLog()
    shown = [line for line in text.splitlines(keepends=True) if log.read(line)]
    return log, shown


def test_a_rank_killed_before_the_mesh_is_up_is_named_not_the_peer_that_was_refused():
    log, shown = read_all((DATA / "torchrun_peer_refused.txt").read_text())
    assert log.verdict(1) == "rank 1 died (killed by SIGKILL); rank(s) 0 lost their peer"
    # the user sees rank 0's own line, not gloo's connect retries nor torchrun's report
    assert len(shown) == 1 and shown[0].startswith("moespec: rank 0 failed: RuntimeError: Gloo connectFullMesh")


def test_a_rank_killed_while_starting_is_named_not_the_rank_the_agent_stopped():
    log, shown = read_all((DATA / "torchrun_killed_while_starting.txt").read_text())
    assert log.verdict(1) == "rank 1 died (killed by SIGKILL)"
    assert shown == []


def test_a_rank_that_raised_is_the_cause_and_the_ranks_that_lost_it_follow():
    log, _ = read_all(
        "moespec: rank 1 failed: ValueError: token ids out of range\n"
        "moespec: rank 0 failed: RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:4242\n"
    )
    assert log.verdict(1) == "rank 1 failed: ValueError: token ids out of range (then rank(s) 0 stopped)"


def test_a_clean_run_has_no_verdict_and_a_silent_failure_still_gets_one():
    assert FailureLog().verdict(0) is None
    assert FailureLog().verdict(3) == "distributed run failed with exit code 3"


def _rank_process(body: str) -> "subprocess.CompletedProcess[str]":
    """A process that runs `body` as a rank's work under run_rank, with an exit hook that
    prints 'finalized' if the interpreter's normal exit runs."""
    code = ("import atexit\n"
            "atexit.register(lambda: print('finalized', flush=True))\n"
            "from moespec.distributed.launch import run_rank\n"
            f"run_rank(lambda: {body})\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_a_finished_rank_exits_zero_with_its_output_and_skips_finalization():
    # finalization is where gloo's threads were seen to abort a finished rank (run_rank)
    done = _rank_process("print('report', end='')")  # no newline: flushed by run_rank, not by exit
    assert (done.returncode, done.stdout) == (0, "report")


def test_a_failed_rank_exits_one_with_a_line_naming_it():
    failed = _rank_process("1 / 0")
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr.strip() == "moespec: rank 0 failed: ZeroDivisionError: division by zero"
