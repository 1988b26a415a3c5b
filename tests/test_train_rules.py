"""Every parallelism key takes effect in `train` and `profile` or is refused: global_batch
accumulates micro-batches, recompute is applied, and a spec one process cannot run honestly
(world > 1 without --single-process, tp or pp > 1) is refused in one line with exit code 2
before anything is launched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from cli_here import run_here

from moespec.data.corpus import get_batch, load_split
from moespec.distributed.context import DistributedConfigError
from moespec.distributed.parallelize import recompute_mode
from moespec.model.build import build_model
from moespec.spec import load_plan, plan_from_text
from moespec.train import lm_loss, micro_generator, train

ROOT = Path(__file__).resolve().parents[1]
TINY_EP = ROOT / "specs" / "tiny-ep.yaml"  # dp 2, ep 2, micro_batch 4, global_batch 8

SMALL = """
version: 1
name: rules-{name}
model: {{vocab_size: 256, d_model: 32, n_layers: 2, n_heads: 2, d_ff: 64, seq_len: 16}}
moe:
  placement: {{type: every, every: 2, offset: 1}}
  experts: {{count: 4, d_ff: 32}}
  router: {{type: topk, k: 2}}
  capacity: {{factor: 1.25}}
parallelism: {{{parallelism}}}
"""


def moespec(*args: str) -> subprocess.CompletedProcess:
    return run_here(*args)  # refusals come before anything launches


def _write(tmp_path: Path, name: str, parallelism: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SMALL.format(name=name, parallelism=parallelism))
    return path


def _refused(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# --- global_batch: micro-batches per optimizer step -------------------------------------------


def _forward_inputs(model) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if module.training else None)
    return seen


def test_train_accumulates_global_batch_over_micro_batches_and_applies_recompute():
    plan = plan_from_text(SMALL.format(name="accum", parallelism="micro_batch: 2, global_batch: 4, recompute: selective"))
    assert plan.parallel.grad_accum == 2
    model = build_model(plan, seed=0)
    seen = _forward_inputs(model)
    train(model, plan, steps=3, seed=5)
    assert recompute_mode(model) == "selective"
    assert len(seen) == 3 * 2 and all(x.shape == (2, 16) for x in seen)  # 2 micro-batches of [2, S] per step
    # Micro-batch j of step s is drawn from a generator of (seed, s, j) alone: the data a step
    # sees does not depend on the layout or on where a run resumed.
    expected = [get_batch(load_split().train, batch=2, seq_len=16, generator=micro_generator(5, step, j))[:, :-1]
                for step in (1, 2, 3) for j in (0, 1)]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])


def test_a_step_reports_all_its_micro_batches():
    """The step's loss is the mean of its micro-batches' losses (what the gradient is of),
    computed here by running the same windows through an identical model one at a time;
    expert loads count every micro-batch's tokens (2 micro-batches of 2 x 16 tokens, k 2)."""
    plan = plan_from_text(SMALL.format(name="accum", parallelism="micro_batch: 2, global_batch: 4"))
    model, twin = build_model(plan, seed=0), build_model(plan, seed=0)
    record = train(model, plan, steps=1, seed=5).records[0]
    twin.train()
    with torch.no_grad():
        losses = []
        for j in range(2):  # step 1's micro-batches 0 and 1
            window = get_batch(load_split().train, batch=2, seq_len=16, generator=micro_generator(5, 1, j))
            logits, aux = twin(window[:, :-1])
            losses.append(float(lm_loss(logits, window[:, 1:]) + aux.aux_loss))
    assert record.loss == pytest.approx(sum(losses) / 2, rel=1e-6)  # fp32 sums in another order
    assert all(sum(counts) == 2 * 2 * 16 * 2 for counts in record.tokens_per_expert.values())


def test_batch_overrides_the_micro_batch_size_only():
    plan = plan_from_text(SMALL.format(name="accum", parallelism="micro_batch: 2, global_batch: 4"))
    model = build_model(plan, seed=0)
    seen = _forward_inputs(model)
    train(model, plan, steps=1, batch=3)
    assert [x.shape for x in seen] == [(3, 16), (3, 16)]


def test_library_train_refuses_tensor_parallel():
    plan = plan_from_text(SMALL.format(name="tp", parallelism="tp: 2"))
    with pytest.raises(DistributedConfigError, match=r"parallelism.tp \(2\)"):
        train(build_model(plan, seed=0), plan, steps=1)


def test_single_process_runs_the_data_parallel_math_and_says_so():
    result = moespec("train", str(TINY_EP), "--steps", "1", "--single-process", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    plan = load_plan(TINY_EP)
    assert doc["micro_batch"] == 4 and doc["micro_batches_per_step"] == plan.parallel.global_batch // 4 == 2
    assert "ep (2)" in doc["single_process"] and "zero_stage (0)" in doc["single_process"]
    assert "world" not in doc  # one process, no ranks


# --- refusals: one line, exit 2, nothing launched ---------------------------------------------


@pytest.mark.parametrize("command", ["train", "profile"])
def test_world_above_one_in_one_process_is_refused(command, tmp_path):
    out = tmp_path / "out"
    extra = ["--steps", "1"] + (["--out", str(out)] if command == "profile" else [])
    _refused(moespec(command, str(TINY_EP), *extra), "--nproc 2", "--single-process")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "profile"])
@pytest.mark.parametrize("degree", ["tp", "pp"])
def test_tensor_and_pipeline_parallel_need_their_ranks(command, degree, tmp_path):
    """train and profile run tp/pp only on the ranks they split over (tests/test_model_parallel.py):
    in one process they say so in one line."""
    spec = _write(tmp_path, degree, f"{degree}: 2" + (", global_batch: 2" if degree == "pp" else ""))
    out = tmp_path / "out"
    extra = ["--steps", "1"] + (["--out", str(out)] if command == "profile" else [])
    for flags in ([], ["--single-process"]):
        _refused(moespec(command, str(spec), *extra, *flags), f"parallelism.{degree} (2)")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "profile"])
def test_single_process_with_nproc_is_refused(command):
    _refused(moespec(command, str(TINY_EP), "--steps", "1", "--single-process", "--nproc", "2"), "--single-process", "--nproc 2")
