"""Training for real: the user's token files, DCP checkpoints that resume with the same losses
(also on another layout), ranks that build only their experts, and the Python API.

Every comparison is between two runs that took different paths to the same step (one
uninterrupted, one stopped and resumed; one process and several ranks), never between a value
and itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moespec
from moespec import checkpoint as ckpt
from moespec.cli.app import app
from moespec.data.tokens import TokenFileError, load_token_split, prepare
from moespec.model.build import build_model
from moespec.spec import load_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs" / "tiny-topk.yaml"
EP = ROOT / "specs" / "tiny-ep.yaml"
PP = ROOT / "specs" / "tiny-pp2.yaml"
TP = ROOT / "specs" / "tiny-tp2.yaml"
TEXT = "The router sends each token to its top-k experts; a capacity factor bounds their load. " * 60

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def moespec_cli(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moespec", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def losses(doc: dict) -> list[float]:
    return [r["loss"] for r in doc["records"]]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    result = invoke("data", "prepare", folder / "text.txt", "--out", folder / "tokens.bin", "--json")
    assert result.exit_code == 0, result.output
    return folder / "tokens.bin"


# --- data -------------------------------------------------------------------------------------


def test_prepare_writes_the_text_bytes_and_a_sidecar(token_file):
    ids = np.fromfile(token_file, dtype=np.uint16)
    assert bytes(ids.astype(np.uint8)) == TEXT.encode()
    meta = json.loads(token_file.with_name("tokens.bin.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "bytes" and meta["tokens"] == len(TEXT.encode())
    split = load_token_split(token_file, vocab_size=256, window=65)
    assert len(split.train) + len(split.val) == len(ids) and len(split.val) == len(ids) - int(len(ids) * 0.9)
    # text and its token file are the same data
    text_split = load_token_split(token_file.with_name("text.txt"), vocab_size=256, window=65)
    assert np.array_equal(np.asarray(text_split.train), np.asarray(split.train))


def test_bad_token_files_are_one_line_errors(tmp_path, token_file):
    cases = {}
    np.save(tmp_path / "floats.npy", np.zeros(1000, dtype=np.float32))
    cases["floats.npy"] = "holds float32"
    np.save(tmp_path / "matrix.npy", np.zeros((10, 100), dtype=np.uint16))
    cases["matrix.npy"] = "shape (10, 100)"
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    cases["odd.bin"] = "not a whole number of uint16"
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "short.bin")
    cases["short.bin"] = "each needs at least 66"
    ids = np.full(5000, 7, dtype=np.uint16)
    ids[4321] = 300
    ids.tofile(tmp_path / "big_id.bin")
    cases["big_id.bin"] = "token id 300 at position 4,321 is outside the model's vocabulary of 256"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 500)
    cases["latin1.txt"] = "not UTF-8 text"
    for name, needle in cases.items():
        with pytest.raises(TokenFileError) as caught:
            load_token_split(tmp_path / name, vocab_size=256, window=65)
        assert needle in str(caught.value) and "\n" not in str(caught.value), (name, caught.value)
        result = invoke("train", TINY, "--steps", "1", "--data", tmp_path / name)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and needle in result.stderr, (name, result.stderr)
    # uint32 ids read as uint16 from a sidecar-less .bin: caught by --data-dtype or the vocabulary
    np.full(4000, 70000, dtype=np.uint32).tofile(tmp_path / "wide.bin")
    assert "outside the model's vocabulary" in invoke("train", TINY, "--steps", "1", "--data", tmp_path / "wide.bin", "--data-dtype", "uint32").stderr
    assert invoke("data", "prepare", tmp_path / "nope.txt", "--out", tmp_path / "x.bin").exit_code == 2
    assert not (tmp_path / "x.bin").exists()


# --- checkpoints in one process -----------------------------------------------------------------


def test_resume_gives_the_uninterrupted_losses_and_refuses_another_model(tmp_path, token_file):
    full = invoke("train", TINY, "--steps", "4", "--data", token_file, "--save", tmp_path / "ck", "--save-every", "2", "--json")
    assert full.exit_code == 0, full.output
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step-00000004"
    resumed = invoke("train", TINY, "--steps", "4", "--data", token_file, "--resume", tmp_path / "ck" / "step-00000002", "--json")
    assert resumed.exit_code == 0, resumed.output
    full_doc, resumed_doc = json.loads(full.stdout), json.loads(resumed.stdout)
    assert resumed_doc["resumed_from"] == 2 and [r["step"] for r in resumed_doc["records"]] == [3, 4]
    assert losses(resumed_doc) == losses(full_doc)[2:]  # bit for bit: model, AdamW state, data position, RNG
    assert resumed_doc["final_val_loss"] == full_doc["final_val_loss"]
    # a checkpoint at or past --steps, and one of another model: one line, exit 2
    done = invoke("train", TINY, "--steps", "4", "--resume", tmp_path / "ck")
    assert done.exit_code == 2 and "is at step 4" in done.stderr
    other = invoke("train", ROOT / "specs" / "tiny-mla.yaml", "--steps", "5", "--resume", tmp_path / "ck")
    assert other.exit_code == 2 and other.stderr.count("\n") == 1 and "written for another model" in other.stderr
    empty = invoke("train", TINY, "--steps", "5", "--resume", tmp_path)
    assert empty.exit_code == 2 and "no checkpoint there" in empty.stderr


def test_a_save_killed_midway_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    plan = load_plan(TINY)
    setup = moespec.prepare_training(build_model(plan, seed=1), plan)
    windows = moespec.step_windows(plan, _corpus(), step=1, seed=1,
                                   micros=range(moespec.micro_batches(plan)), batch=2, seq_len=plan.model.seq_len)  # fmt: skip
    moespec.train_step(setup, plan, windows)
    moespec.save_checkpoint(setup, plan, tmp_path, step=1)
    good = {k: v.clone() for k, v in setup.bare_model.state_dict().items()}
    moespec.train_step(setup, plan, windows)

    real_save = ckpt.dcp.save

    def dies_midway(state, *, checkpoint_id, **kw):
        real_save(dict(list(state.items())[:3]), checkpoint_id=checkpoint_id, **kw)  # some files written, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.dcp, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        moespec.save_checkpoint(setup, plan, tmp_path, step=2)
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    assert (tmp_path / "latest").read_text().strip() == "step-00000001" and (tmp_path / ".step-00000002.tmp").is_dir()
    fresh = moespec.prepare_training(build_model(plan, seed=99), plan)
    assert moespec.load_checkpoint(fresh, plan, tmp_path) == 1
    assert all(torch.equal(good[k], v) for k, v in fresh.bare_model.state_dict().items())
    moespec.save_checkpoint(setup, plan, tmp_path, step=2)  # the next save clears the leftover
    assert not (tmp_path / ".step-00000002.tmp").exists() and (tmp_path / "latest").read_text().strip() == "step-00000002"


def _corpus():
    from moespec.data.corpus import load_split

    return load_split().train


# --- ranks that hold only their experts -----------------------------------------------------------


@pytest.mark.parametrize("spec", ["tiny-ep.yaml", "tiny-oss.yaml", "tiny-dropless.yaml"])
def test_a_rank_builds_exactly_its_slice_of_the_whole_model(spec):
    plan = load_plan(ROOT / "specs" / spec)
    whole = build_model(plan, seed=7).state_dict()
    n_experts = max(layer.moe.experts.count for layer in plan.layers if layer.moe is not None)
    for ep in (2, 4):
        if n_experts % ep:
            continue
        for rank in range(ep):
            part = build_model(plan, seed=7, expert_shard=(rank, ep)).state_dict()
            assert part.keys() == whole.keys()
            sliced = 0
            for name, value in part.items():
                full = whole[name]
                if value.shape != full.shape:  # an expert bank: this rank's E/ep rows
                    n = value.shape[0]
                    full, sliced = full[rank * n : (rank + 1) * n], sliced + 1
                assert torch.equal(value, full), (spec, ep, rank, name)
            assert sliced > 0


# --- distributed: same world and another layout -----------------------------------------------------


def test_distributed_resume_and_resharding(tmp_path):
    """ep 2 on 2 ranks saves at step 2 of 4; resuming there on 2 ranks gives the same losses, and
    so does one process (every expert in one bank: DCP reshards the per-expert entries)."""
    full = moespec_cli("train", EP, "--steps", "4", "--nproc", "2", "--save", tmp_path / "ep", "--save-every", "2", "--json")
    assert full.returncode == 0, full.stderr[-2000:]
    reference = losses(json.loads(full.stdout))
    again = moespec_cli("train", EP, "--steps", "4", "--nproc", "2", "--resume", tmp_path / "ep" / "step-00000002", "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert losses(json.loads(again.stdout)) == reference[2:]
    one = invoke("train", EP, "--steps", "4", "--single-process", "--resume", tmp_path / "ep" / "step-00000002", "--json")
    assert one.exit_code == 0, one.output
    assert losses(json.loads(one.stdout)) == pytest.approx(reference[2:], rel=1e-5)


def test_pipeline_checkpoint_resumes_under_tensor_parallelism(tmp_path):
    """tiny-pp2, tiny-tp2 and tiny-tp2-sp are one model split three ways: a pipeline run's
    checkpoint resumes tensor-parallel, with and without sequence parallelism, with the
    pipeline run's own later losses."""
    pp = moespec_cli("train", PP, "--steps", "3", "--nproc", "2", "--save", tmp_path / "pp", "--save-every", "1", "--json")
    assert pp.returncode == 0, pp.stderr[-2000:]
    reference = losses(json.loads(pp.stdout))
    tp = moespec_cli("train", TP, "--steps", "3", "--nproc", "2", "--resume", tmp_path / "pp" / "step-00000001", "--json")
    assert tp.returncode == 0, tp.stderr[-2000:]
    assert losses(json.loads(tp.stdout)) == pytest.approx(reference[1:], rel=1e-5)
    # and under sequence parallelism (its norms' weights are replicated DTensors)
    sp = moespec_cli("train", ROOT / "specs" / "tiny-tp2-sp.yaml", "--steps", "3", "--nproc", "2", "--resume", tmp_path / "pp" / "step-00000001", "--json")
    assert sp.returncode == 0, sp.stderr[-2000:]
    assert losses(json.loads(sp.stdout)) == pytest.approx(reference[1:], rel=1e-5)


def test_checkpoints_refuse_zero_sharded_state(tmp_path):
    zero = tmp_path / "zero.yaml"
    zero.write_text(EP.read_text().replace("global_batch: 8", "global_batch: 8\n  zero_stage: 1"))
    result = invoke("train", zero, "--steps", "2", "--nproc", "2", "--save", tmp_path / "z")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "zero_stage 1" in result.stderr, result.stderr


# --- the Python API ---------------------------------------------------------------------------------


def test_the_api_loop_trains_like_the_command(tmp_path, token_file):
    plan = moespec.load_spec(TINY)
    setup = moespec.prepare_training(moespec.build_model(plan, seed=0), plan, lr=3e-3)
    split = moespec.load_tokens(token_file, vocab_size=plan.model.vocab_size, window=plan.model.seq_len + 1)
    mine = []
    for step in (1, 2):
        windows = moespec.step_windows(plan, split.train, step=step, seed=0, micros=range(moespec.micro_batches(plan)),
                                       batch=plan.parallel.micro_batch, seq_len=plan.model.seq_len)  # fmt: skip
        mine.append(float(moespec.train_step(setup, plan, windows)[0]))
    command = invoke("train", TINY, "--steps", "2", "--data", token_file, "--json")
    assert mine == losses(json.loads(command.stdout))


def test_a_requeued_job_resumes_from_its_own_save_folder_and_logs_scalars(tmp_path, token_file):
    """The same command line for the first submission and every requeue: --resume naming the
    --save folder starts from step 0 while it holds no checkpoint, then resumes. TensorBoard
    gets one loss and one tokens/s scalar per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--data", token_file, "--save", tmp_path / "ck", "--resume", tmp_path / "ck", "--tensorboard", tmp_path / "tb", "--json"]
    first = invoke("train", TINY, "--steps", "2", *args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["resumed_from"] == 0
    again = invoke("train", TINY, "--steps", "3", *args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["resumed_from"] == 2 and [r["step"] for r in json.loads(again.stdout)["records"]] == [3]
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2, 3]
    ce = [r["ce_loss"] for doc in (first, again) for r in json.loads(doc.stdout)["records"]]
    assert [e.value for e in events.Scalars("loss/train")] == pytest.approx(ce)
    assert all(e.value > 0 for e in events.Scalars("throughput/tokens_per_s"))


def test_text_through_a_hugging_face_tokenizer(tmp_path):
    """--tokenizer takes a Hugging Face tokenizer (a local folder here: no network), and the ids
    it gives are checked against the model's vocabulary like any token file's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.replace(";", " ").replace(",", " ").replace(".", " ").split())) + ["[UNK]"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    done = invoke("data", "prepare", tmp_path / "text.txt", "--out", tmp_path / "words.npy", "--tokenizer", tmp_path / "tok", "--json")
    assert done.exit_code == 0, done.output
    ids = np.load(tmp_path / "words.npy")
    assert ids.dtype == np.uint16 and len(ids) == len(core.encode(TEXT).ids) and int(ids.max()) < len(words)
    trained = invoke("train", TINY, "--steps", "1", "--data", tmp_path / "words.npy", "--json")
    assert trained.exit_code == 0 and json.loads(trained.stdout)["data"].endswith("words.npy")
    missing = invoke("data", "prepare", tmp_path / "text.txt", "--out", tmp_path / "x.bin", "--tokenizer", tmp_path / "nowhere")
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1 and "could not be loaded" in missing.stderr, missing.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_scheduler_stop_ends_the_launcher_and_every_rank(sig, tmp_path):
    """SLURM and Kubernetes stop a job with SIGTERM (a closed terminal sends SIGHUP): the
    command ends its launcher and both ranks, says so in one line, and writes no checkpoint
    after the stop."""
    import signal
    import time

    spec = tmp_path / "stopme.yaml"  # a unique path: the processes of this run are found by it
    spec.write_text(EP.read_text())
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moespec", "train", str(spec), "--steps", "100000", "--nproc", "2",
                             "--save", str(tmp_path / "ck"), "--save-every", "100000"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def ours() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(spec).encode() in cmdline and int(pid) != proc.pid:
                found.append(int(pid))
        return found

    try:
        deadline = time.time() + 90
        while len(ours()) < 3 and time.time() < deadline:  # torchrun's agent and two ranks
            time.sleep(0.5)
        assert len(ours()) >= 3, "the ranks never started"
        time.sleep(2)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert f"stopped by {sig}" in err and err.strip().count("\n") == 0, err[-1500:]
        time.sleep(1)
        assert ours() == [], "processes were left running"
    finally:  # whatever failed above, nothing of this run outlives the test
        for pid in [proc.pid, *ours()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not (tmp_path / "ck" / "latest").exists()


def test_a_stopped_rank_is_named_within_the_timeout(tmp_path):
    """A rank that stops answering (SIGSTOP here; a hung kernel or a debugger alike) is named,
    the run ends soon after --timeout rather than after the launcher's own grace, and nothing
    is left behind (a stopped process only ends by SIGKILL)."""
    import signal
    import time

    spec = tmp_path / "stopped.yaml"
    spec.write_text(EP.read_text())
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moespec", "train", str(spec), "--steps", "100000", "--nproc", "2", "--timeout", "5"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def workers() -> dict[int, int]:
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ, cmdline = Path(f"/proc/{pid}/environ").read_bytes(), Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(spec).encode() in cmdline and b"LOCAL_RANK=" in environ:
                found[int(next(e[5:] for e in environ.split(b"\0") if e.startswith(b"RANK=")))] = int(pid)
        return found

    try:
        deadline = time.time() + 90
        while len(workers()) < 2 and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(4)  # into the steps
        os.kill(workers()[1], signal.SIGSTOP)
        stopped_at = time.time()
        err = proc.communicate(timeout=90)[1]
        assert time.time() - stopped_at < 5 + 20, "the run outlived --timeout by far"
        assert proc.returncode == 1 and "rank(s) 1 (stopped) never answered" in err.strip().splitlines()[-1], err[-1500:]
        time.sleep(1)
        assert workers() == {}
    finally:  # whatever failed above, nothing of this run outlives the test
        for pid in [proc.pid, *workers().values()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
