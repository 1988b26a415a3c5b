"""Tensor and pipeline parallelism on real gloo ranks (world 2 and 4): one step's loss and
every gradient equal a single process accumulating the same micro-batches (REFERENCE sec. 3),
the collectives tensor parallelism calls, and the spec refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from moespec.distributed.parity import model_parallel_worker, plan_fields, plan_from_fields
from moespec.sim.backend import load_backend
from moespec.sim.model import simulate
from moespec.sim.stages import busiest_rank
from moespec.spec.stages import rank_stages
from moespec.spec import SpecErrors, load_plan, plan_from_text
from tests.test_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def case(spec: str, tied: bool = False, **parallel) -> dict:
    """A tiny spec at the given degrees, sequences cut to 32 tokens to keep the test short."""
    plan = load_plan(ROOT / "specs" / spec)
    model = dataclasses.replace(plan.model, seq_len=32, tied_embeddings=tied or plan.model.tied_embeddings)
    return plan_fields(dataclasses.replace(plan, model=model, parallel=dataclasses.replace(plan.parallel, **parallel)))


WORLD_2 = [
    # gpt-oss in miniature: GQA, sinks split with the heads, q/k/v/o biases, dropless top-4
    ("tp2-oss", case("tiny-oss.yaml", tp=2, micro_batch=2, global_batch=4)),
    ("tp2-topk", case("tiny-topk.yaml", tp=2, micro_batch=2, global_batch=4)),
    # a random router (SparseMixer samples in training): every tp rank draws the single process's samples
    ("tp2-sparsemixer", case("tiny-sparsemixer.yaml", tp=2, micro_batch=2, global_batch=4)),
    # shared experts (2 x 33 = 66 wide, gated output) beside a dense block, q/k/v biases, a tied head
    ("tp2-shared", plan_fields(plan_from_text("""version: 1
name: tp-shared
model: {vocab_size: 256, d_model: 32, n_layers: 2, n_heads: 4, d_ff: 96, seq_len: 32, qkv_bias: true, tied_embeddings: true, activation: swiglu}
moe: {placement: {type: layers, layers: [1]}, experts: {count: 4, d_ff: 16, shared_count: 2, shared_d_ff: 33, shared_gate: true},
      router: {type: topk, k: 2}, capacity: {dropless: true}}
parallelism: {tp: 2, micro_batch: 2, global_batch: 2}
""", "tp-shared.yaml"))),
    # sequence parallelism: norms and residual stream on S/tp tokens; gpt-oss's sinks and biases;
    # Llama-4's shared expert, gated input, NoPE layer and L2 QK-norm
    ("tp2-sp-oss", case("tiny-oss.yaml", tp=2, micro_batch=2, global_batch=4, sequence_parallel=True)),
    ("tp2-sp-llama4", case("tiny-llama4.yaml", tp=2, micro_batch=2, global_batch=4, sequence_parallel=True)),
    # recomputation replays the split modules' collectives (full) or the attention core (selective)
    ("tp2-sp-hash-full", case("tiny-hash.yaml", tp=2, micro_batch=2, global_batch=4, sequence_parallel=True, recompute="full")),
    ("pp2-1f1b-selective", case("tiny-topk.yaml", pp=2, micro_batch=2, global_batch=4, recompute="selective")),
    ("pp2-gpipe", case("tiny-topk.yaml", pp=2, micro_batch=2, global_batch=4, pp_schedule="gpipe")),
    ("pp2-1f1b", case("tiny-topk.yaml", pp=2, micro_batch=2, global_batch=6, pp_schedule="1f1b")),
    # a tied head: the first and the last stage each hold the table, their gradients summed
    ("pp2-interleaved-tied", case("tiny-topk.yaml", tied=True, pp=2, micro_batch=2, global_batch=4, pp_schedule="interleaved_1f1b")),
    # hash routing reads token ids in the second stage: they travel beside the activations
    ("pp2-hash", case("tiny-hash.yaml", pp=2, micro_batch=2, global_batch=4, pp_layers=(1, 3))),
]
WORLD_4 = [
    ("tp2-dp2", case("tiny-topk.yaml", tp=2, dp=2, micro_batch=2, global_batch=4)),
    ("pp2-ep2", case("tiny-ep.yaml", pp=2, dp=2, ep=2, micro_batch=2, global_batch=8)),
    # ZeRO-1 under a pipeline: each rank gathers its own stages' parameters, one call per unit
    ("pp2-dp2-zero1-tied", case("tiny-topk.yaml", tied=True, pp=2, dp=2, zero_stage=1, micro_batch=2, global_batch=8)),
    ("tp2-pp2", case("tiny-topk.yaml", tp=2, pp=2, micro_batch=2, global_batch=4)),
    # sequence parallelism across a stage boundary (stages exchange [B, S/tp, D]), and beside ep
    ("tp2-pp2-sp", case("tiny-topk.yaml", tp=2, pp=2, micro_batch=2, global_batch=4, sequence_parallel=True)),
    ("tp2-dp2-ep2-sp", case("tiny-ep.yaml", tp=2, dp=2, ep=2, micro_batch=2, global_batch=4, sequence_parallel=True)),
]


def run(world: int, cases: list, tmp_path: Path) -> list[dict]:
    mp.spawn(model_parallel_worker, args=(world, free_port(), cases, str(tmp_path)), nprocs=world, join=True)
    return [result for rank in range(world) for result in json.loads((tmp_path / f"rank{rank}.json").read_text())]


def check(results: list[dict]) -> None:
    for result in results:
        label = f"{result['case']} rank {result['rank']}"
        assert result["loss_ok"], f"{label}: loss {result['loss']} vs {result['reference_loss']}"
        assert result["grads_checked"] > 0, label
        assert not result["mismatched"], f"{label}: gradients differ: {result['mismatched']}"


@pytest.mark.timeout(600)
def test_tp2_and_pp2_steps_equal_single_process(tmp_path):
    results = run(2, WORLD_2, tmp_path)
    check(results)
    by = {(r["case"], r["rank"]): r for r in results}
    # Tensor parallel all-reduces one [B, S, D] per row-parallel projection forward and one per
    # split module's input backward: attention in every block, the dense FFN in tiny-topk's two
    # dense blocks; two micro-batches. Nothing else communicates in the step (no dp, no ep).
    reduces = "_c10d_functional.all_reduce"
    assert by[("tp2-topk", 0)]["collectives"][reduces] == 2 * 2 * (4 + 2)
    assert by[("tp2-oss", 0)]["collectives"][reduces] == 2 * 2 * 4
    assert by[("tp2-shared", 0)]["collectives"][reduces] == 1 * 2 * (2 + 1 + 1)  # 1 micro-batch; attention x 2, dense FFN, shared experts
    # Sequence parallelism: attention and dense FFNs all-gather their input and reduce-scatter
    # their output forward and backward, a MoE block gathers its input and its output's
    # gradient, plus the final norm's input and the first block's gradient: in gpt-oss (4 MoE
    # blocks) 4 * 2 + 4 * 2 + 2 gathers and 4 * 2 scatters per micro-step; Llama-4's shared
    # expert still all-reduces (2 MoE blocks, each 2 per micro-step).
    gathers, scatters = "_c10d_functional.all_gather_into_tensor", "_c10d_functional.reduce_scatter_tensor"
    assert by[("tp2-sp-oss", 0)]["collectives"][gathers] == 2 * 18 and by[("tp2-sp-oss", 0)]["collectives"][scatters] == 2 * 8
    assert reduces not in by[("tp2-sp-oss", 0)]["collectives"]
    assert by[("tp2-sp-llama4", 0)]["collectives"][reduces] == 2 * 2 * 2
    # full recomputation replays each block's forward gathers and scatters: 6 + 2 and 6 more per micro-step
    assert by[("tp2-sp-hash-full", 0)]["collectives"][gathers] == 2 * (18 + 8)
    for name in ("tp2-topk", "tp2-oss", "tp2-shared", "tp2-sp-oss", "tp2-sp-llama4", "tp2-sp-hash-full"):  # simulate counts the same calls
        plan = plan_from_fields(dict(WORLD_2)[name])
        predicted = simulate(plan, load_backend("cpu-local"))
        for kind, op in (("all_reduce", reduces), ("all_gather", gathers), ("reduce_scatter", scatters)):
            calls = predicted[f"tp_{kind}_calls_per_rank_microstep"]
            assert calls * plan.parallel.grad_accum == by[(name, 0)]["collectives"].get(op, 0), (name, kind)
    # What a tensor-parallel rank holds is what simulate predicts, exactly: attention, dense and
    # shared FFNs split, the router, experts, norms, embeddings and head whole. (FLOPs are not
    # compared here: FlopCounterMode counts a DTensor matmul at its global shape.)
    for name in ("tp2-topk", "tp2-oss", "tp2-shared", "tp2-sp-llama4"):
        predicted = simulate(plan_from_fields(dict(WORLD_2)[name]), load_backend("cpu-local"))
        for rank in (0, 1):
            assert by[(name, rank)]["state_bytes"] == predicted["state_bytes_per_rank"], (name, rank)
    # Pipeline: the stages the runtime cut (balanced by each block's active parameters, read off
    # the module) are the simulator's, and so is what each pipeline rank holds, exactly.
    for name in ("pp2-gpipe", "pp2-1f1b", "pp2-interleaved-tied", "pp2-hash"):
        plan = plan_from_fields(dict(WORLD_2)[name])
        stages = busiest_rank(plan)
        for rank in (0, 1):
            result = by[(name, rank)]
            assert result["stage_blocks"] == [list(stages["bounds"][s]) for s in rank_stages(plan)[result["pp_rank"]]], name
            held = stages["ranks"][result["pp_rank"]]
            assert result["state_bytes"] == {"params": held["params_bytes"], "grads": held["grads_bytes"], "optimizer": held["optimizer_bytes"]}, (name, rank)
    assert by[("pp2-hash", 0)]["stage_blocks"] == [[0, 1]]  # pp_layers [1, 3] as written
    # A pipeline stage holds only its blocks: the second stage of pp_layers (1, 3) checks 3 blocks' grads.
    assert by[("pp2-hash", 1)]["grads_checked"] > by[("pp2-hash", 0)]["grads_checked"]


@pytest.mark.timeout(600)
def test_tp_pp_dp_ep_combinations_on_4_ranks_equal_single_process(tmp_path):
    results = run(4, WORLD_4, tmp_path)
    check(results)
    # every pipeline rank's sequence-parallel gathers and scatters are the simulator's for that rank
    plan = plan_from_fields(dict(WORLD_4)["tp2-pp2-sp"])
    stages = busiest_rank(plan)["ranks"]
    for result in (r for r in results if r["case"] == "tp2-pp2-sp"):
        for kind, op in (("all_gather", "_c10d_functional.all_gather_into_tensor"), ("reduce_scatter", "_c10d_functional.reduce_scatter_tensor")):
            assert stages[result["pp_rank"]][f"tp_{kind}_calls"] * plan.parallel.grad_accum == result["collectives"][op], (result["rank"], kind)
    # what every rank holds is what the simulator says its pipeline rank holds (tp split, E/ep experts)
    for result in results:
        plan = plan_from_fields(dict(WORLD_4)[result["case"]])
        if plan.parallel.pp > 1:
            held = busiest_rank(plan)["ranks"][result["pp_rank"]]
            expected = {"params": held["params_bytes"], "grads": held["grads_bytes"], "optimizer": held["optimizer_bytes"]}
        else:
            expected = simulate(plan, load_backend("h100-cluster-4n"))["state_bytes_per_rank"]
        assert result["state_bytes"] == expected, (result["case"], result["rank"])
        # ZeRO-1's all-gathers after the step: one per unit of the rank's stages (each block,
        # and the embeddings or the final norm and head with the tied table's copy); simulate
        # reports the busiest rank's
        gathers = busiest_rank(plan)["ranks"][result["pp_rank"]]["zero_all_gather_calls"] if plan.parallel.pp > 1 else None
        if plan.parallel.zero_stage == 1:
            assert result["optimizer_collectives"]["all_gather"] == gathers > 0, (result["case"], result["rank"])
    zero1 = plan_from_fields(dict(WORLD_4)["pp2-dp2-zero1-tied"])
    assert simulate(zero1, load_backend("h100-cluster-4n"))["collective_calls_per_step"]["all_gather"] == max(
        r["optimizer_collectives"]["all_gather"] for r in results if r["case"] == "pp2-dp2-zero1-tied")


def _spec(parallel: str, model_extra: str = "") -> str:
    return f"""version: 1
name: mp
model: {{vocab_size: 256, d_model: 64, n_layers: 4, n_heads: 4, d_ff: 128, seq_len: 32{model_extra}}}
moe: {{experts: {{count: 4, d_ff: 64}}, router: {{type: topk, k: 2}}}}
parallelism: {{{parallel}}}
"""


@pytest.mark.parametrize("parallel,extra,path,needle", [
    ("pp: 2, micro_batch: 2, global_batch: 2", "", "parallelism.pp_schedule", "1f1b needs at least pp (2) micro-batches"),
    ("pp: 2, pp_layers: [1, 2]", "", "parallelism.pp_layers", "sums to 3 blocks but the model has 4"),
    ("pp: 2, pp_layers: [1, 1, 2]", "", "parallelism.pp_layers", "has 3 entries but the pipeline has 2 stages"),
    ("pp: 4, pp_schedule: interleaved_1f1b, global_batch: 4", "", "parallelism.pp_schedule", "2 * pp = 8 stages"),
    ("pp_layers: [4]", "", "parallelism.pp_layers", "parallelism.pp is 1"),
    ("tp: 3", "", "parallelism.tp", "tp (3) must divide model.n_heads (4)"),
    ("tp: 2", ", dropout: 0.1", "model.dropout", "same masks on every tp rank"),
    ("tp: 2", ", qk_norm: full", "model.qk_norm", "normalises across all heads"),
    ("tp: 2, zero_stage: 1", "", "parallelism.zero_stage", "not combined with tensor parallelism"),
    ("sequence_parallel: true", "", "parallelism.sequence_parallel", "parallelism.tp is 1"),
    ("pp: 2, global_batch: 2, zero_stage: 2", "", "parallelism.zero_stage", "2 and 3 (FSDP2) are not combined with pipeline parallelism"),
    ("pp: 2, global_batch: 2, precision: fp16", "", "parallelism.precision", "fp16"),
])  # fmt: skip
def test_what_cannot_run_split_is_refused_naming_the_key(parallel, extra, path, needle):
    with pytest.raises(SpecErrors) as info:
        plan_from_text(_spec(parallel, extra), "mp.yaml")
    text = str(info.value)
    assert path in text and needle in text, text


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    with pytest.raises(SpecErrors) as info:
        plan_from_text(_spec("tp: 4, sequence_parallel: true").replace("seq_len: 32", "seq_len: 30"), "mp.yaml")
    text = str(info.value)
    assert "parallelism.sequence_parallel" in text and "tp (4) does not divide model.seq_len (30)" in text, text


def test_tp_must_divide_the_widths_it_splits():
    text = _spec("tp: 4").replace("d_ff: 128", "d_ff: 126").replace("d_ff: 64}", "d_ff: 64, shared_count: 1, shared_d_ff: 30}") \
        .replace("moe: {experts", "moe: {placement: {type: every, every: 2}, experts")
    with pytest.raises(SpecErrors) as info:
        plan_from_text(text, "mp.yaml")
    text = str(info.value)
    assert "model.d_ff: tp (4) must divide model.d_ff (126)" in text, text
    assert "moe.experts.shared_d_ff: tp (4) must divide the shared experts' width (shared_count * shared_d_ff = 30)" in text, text


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec,sequences_per_step", [("tiny-tp2-pp2", 8), ("tiny-pp2-ep2", 16)])
def test_train_nproc_4_trains_the_shipped_tp_pp_ep_specs(spec, sequences_per_step):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "moespec", "train", f"specs/{spec}.yaml", "--steps", "8", "--nproc", "4", "--json"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)
    assert document["world"] == 4
    assert document["last_loss"] < document["first_loss"] - 0.3
    # Every MoE layer's loads come from the stage that holds it, summed over dp: steps * sequences * S * k
    for counts in document["tokens_per_expert_total"].values():
        assert sum(counts) == 8 * sequences_per_step * 64 * 2


def _profile(tmp_path: Path, parallel: str, *extra: str) -> dict:
    spec = tmp_path / "profiled.yaml"
    spec.write_text(_spec(parallel).replace("moe: {experts", "moe: {placement: {type: every, every: 2, offset: 1}, experts"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "moespec", "profile", str(spec), "--nproc", "2", "--json", "--out", str(tmp_path / "out"),
                             "--steps", "10", "--warmup", "1", "--trace-steps", "1", *extra],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.timeout(300)
def test_profile_measures_tp_collectives_exactly_as_predicted(tmp_path):
    report = _profile(tmp_path, "tp: 2, micro_batch: 4, global_batch: 8, precision: bf16, recompute: full")
    rows = {row["figure"]: row for row in report["comparison"]}
    assert report["exact_counts"] is True, [r for r in report["comparison"] if r["exact"] and not r["equal"]]
    # 4 attention blocks + 2 dense FFNs, each one all-reduce forward (bf16, 2 bytes; again in
    # the full recomputation's replay) and one backward (the norm output's gradient, float32):
    # 6 * 3 calls, 6 * [4 * 32 tokens, 64] * (2 * 2 + 4) bytes
    assert rows["tensor-parallel all-reduces per rank per micro-step"]["measured"] == 18
    assert rows["tensor-parallel all-reduce bytes per rank per micro-step"]["measured"] == 6 * 4 * 32 * 64 * (2 * 2 + 4)
    assert rows["tensor-parallel collective time per step (s)"]["measured"] > 0
    assert rows["parameters held per rank (bytes)"]["equal"]


@pytest.mark.timeout(300)
def test_profile_measures_sequence_parallel_gathers_and_scatters_exactly(tmp_path):
    report = _profile(tmp_path, "tp: 2, micro_batch: 4, global_batch: 8, precision: bf16, sequence_parallel: true")
    rows = {row["figure"]: row for row in report["comparison"]}
    assert report["exact_counts"] is True, [r for r in report["comparison"] if r["exact"] and not r["equal"]]
    # 4 attention blocks + 2 dense FFNs (sequence-sharded: 6) and 2 MoE blocks, [4 * 32, 64] per micro-step.
    # Gathers: 6 * 2 + 2 * 2 + 2 = 18; a rank contributes its half: the split modules' forward
    # input (a norm's output, float32) and backward output gradient (bf16), the MoE blocks' input
    # and output gradient and the outer two in float32. Scatters: 6 forward (bf16), 6 backward (float32).
    half = 4 * 32 * 64 // 2
    assert rows["tensor-parallel all-gathers per rank per micro-step"]["measured"] == 18
    assert rows["tensor-parallel all-gather bytes per rank per micro-step"]["measured"] == half * (6 * (4 + 2) + 2 * 2 * 4 + 2 * 4)
    assert rows["tensor-parallel reduce-scatters per rank per micro-step"]["measured"] == 12
    assert rows["tensor-parallel reduce-scatter bytes per rank per micro-step"]["measured"] == 2 * half * 6 * (2 + 4)
    assert "tensor-parallel all-reduces per rank per micro-step" not in rows  # no shared experts: nothing all-reduced per micro-step
    assert rows["parameters held per rank (bytes)"]["equal"]


@pytest.mark.timeout(300)
def test_profile_measures_the_pipeline_idle_time_and_the_busiest_stage(tmp_path):
    report = _profile(tmp_path, "pp: 2, micro_batch: 4, global_batch: 8, pp_schedule: gpipe")
    rows = {row["figure"]: row for row in report["comparison"]}
    assert report["exact_counts"] is True, [r for r in report["comparison"] if r["exact"] and not r["equal"]]
    idle = rows["pipeline idle per step, bubble + stage sends (s)"]
    assert 0 < idle["measured"] < report["measured"]["step_s"]["median"] and idle["predicted"] > 0
    # the first stage holds the embeddings, the last the final norm and head: they differ, and
    # the report compares the one that holds the most
    held = [r["state_bytes"]["params"] for r in report["ranks"]]
    assert held[0] != held[1] and rows["parameters held per rank (bytes)"]["measured"] == max(held)


def test_the_explorer_and_validation_share_the_pipeline_micro_batch_rule():
    import numpy as np

    from moespec.spec.rules import PARALLEL_RULES, PP_MICRO_BATCHES
    from moespec.spec.stages import PP_SCHEDULES

    assert PP_MICRO_BATCHES in PARALLEL_RULES  # the explorer flags every rule in PARALLEL_RULES
    codes = np.array([PP_SCHEDULES.index(s) for s in ("gpipe", "1f1b", "1f1b", "interleaved_1f1b", "interleaved_1f1b")])
    values = {"pp": np.array([4, 4, 4, 4, 4]), "pp_schedule": codes, "global_batch": np.array([2, 2, 8, 6, 8]),
              "micro_batch": np.ones(5, dtype=int), "dp": np.ones(5, dtype=int)}  # fmt: skip
    # gpipe takes any count; 1f1b needs >= pp; interleaved needs n % (n // pp) == 0 (6 % 1 fine; 8 % 2 fine)
    assert PP_MICRO_BATCHES.check(values).tolist() == [False, True, False, False, False]
    values["global_batch"] = np.array([2, 2, 8, 9, 10])  # interleaved: 9 % 2, 10 % 2
    assert PP_MICRO_BATCHES.check(values).tolist() == [False, True, False, True, False]
