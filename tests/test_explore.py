"""The design explorer end to end: hand-counted infeasibility, the fast path against the spec
layer design by design, emitted specs that validate, compile and cost the same, the CLI's
files and JSON, and the quality proxy's data."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from moespec.cli import explore_cmd, validate_cmd
from moespec.explore import DesignSpace, explore, load_sweep
from moespec.explore.pareto import dominates_brute, to_costs
from moespec.explore.quality import clark2022, clark_fit
from moespec.explore.run import assess
from moespec.explore.space import FEASIBLE
from moespec.sim.cost import CollectiveCosts
from moespec.sim.design import DesignBatch
from moespec.spec import SpecErrors

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "specs" / "sweeps"
# 1e-9 relative: the batch and scalar simulators agree to a few ulps (tests/test_sim_batch.py).
RTOL = 1e-9


def make_sweep(tmp_path: Path, axes: str, *, extra: str = "", objectives: str = "  tokens_per_s: max\n  quality: min\n"):
    """A sweep over tiny-topk (4 layers, MoE every 2nd, E=4, top-2, 4 heads) on cpu-local (2 ranks)."""
    shutil.copy(REPO / "specs" / "tiny-topk.yaml", tmp_path / "base.yaml")
    text = f"version: 1\nname: t\nbase: base.yaml\nbackend: cpu-local\naxes:\n{axes}{extra}objectives:\n{objectives}"
    (tmp_path / "sweep.yaml").write_text(text)
    return load_sweep(tmp_path / "sweep.yaml")


def app() -> typer.Typer:
    cli = typer.Typer(pretty_exceptions_enable=False)
    cli.command("explore")(explore_cmd.explore_command)
    cli.command("validate")(validate_cmd.validate_command)
    return cli


def test_infeasible_designs_counted_by_hand_parallel_rules(tmp_path):
    sweep = make_sweep(tmp_path, "  moe.experts.count: [3, 4]\n  moe.router.k: [2, 4, 8]\n"
                                 "  parallelism.ep: [1, 2]\n  parallelism.tp: [1, 2, 4]\n")  # fmt: skip
    result = explore(sweep)
    # 36 designs; dp = 2 / tp. Reasons in check order, each design counted once:
    # tp 4: 4 does not divide 2 devices                        -> 2 E x 3 k x 2 ep     = 12
    # tp 2 (dp 1) with ep 2                                    -> 2 E x 3 k            = 6
    # tp 1 (dp 2), ep 2, E 3                                   -> 3 k                  = 3
    # k > E among the rest: E3 (k 4, 8) at tp1/ep1 and tp2/ep1 (4), E4 (k 8) at tp1/ep1,
    #   tp1/ep2 and tp2/ep1 (3)                                                         = 7
    assert result.infeasible_by_reason == {
        "tp * pp does not divide the backend's devices": 12,
        "ep does not divide dp": 6,
        "ep does not divide the expert count": 3,
        "k exceeds the expert count": 7,
    }
    assert result.designs == 36 and result.feasible == 8


def test_infeasible_designs_counted_by_hand_router_and_duplicates(tmp_path):
    sweep = make_sweep(tmp_path, "  moe.router.type: [topk, switch]\n  moe.router.k: [1, 2]\n"
                                 "  moe.capacity.dropless: [false, true]\n  moe.capacity.factor: [1.0, 2.0]\n")  # fmt: skip
    result = explore(sweep)
    # 16 designs: switch routes to one expert, so k = 2 is wrong there (2 dropless settings x
    # 2 factors = 4); dropless capacity has no factor, so factor 2.0 repeats factor 1.0 there:
    # topk with k 1 and 2, switch with k 1 (its k 2 already counted) = 3.
    assert result.infeasible_by_reason == {
        "moe.router.k does not apply: this router sends each token to exactly one expert": 4,
        "duplicate: moe.capacity.factor has no effect on this design": 3,
    }
    assert result.feasible == 9
    space = DesignSpace(sweep)
    values = space.axis_values(np.arange(space.size))
    dropless = [d for d in range(space.size) if values["moe.capacity.dropless"][d]]
    assert all(values["moe.capacity.factor"][d] is None for d in dropless)  # shown as n/a, not 1.0


def test_bounds_and_memory_are_counted(tmp_path):
    sweep = make_sweep(tmp_path, "  moe.experts.count: [2, 4]\n",
                       extra="constraints: {max_memory_per_device_gib: 1.0e-9}\n")  # fmt: skip
    result = explore(sweep)
    assert result.infeasible_by_reason == {"max_memory_per_device_gib not met": 2}
    assert len(result.front) == 0 and len(result.sample) == 0


MIXED_AXES = (
    "  moe.router.type: [topk, switch, noisy_topk]\n"
    "  moe.placement: [{type: all}, {type: every, every: 2, offset: 1}]\n"
    "  moe.experts.count: [2, 3, 4]\n"
    "  moe.router.k: [1, 2, 3]\n"
    "  moe.experts.shared_count: [0, 1]\n"
    "  parallelism.ep: [1, 2]\n"
    "  parallelism.tp: [1, 2]\n"
    "  parallelism.micro_batch: [4, 8]\n"
)


CAPACITY_AXES = (
    "  moe.capacity.dropless: [false, true]\n"
    "  moe.experts.d_ff: [32, 64]\n"
    "  moe.experts.shared_count: [0, 2]\n"
    "  moe.experts.shared_d_ff: [16, 48]\n"
    "  moe.capacity.factor: [1.0, 1.5]\n"
    "  moe.capacity.min_capacity: [0, 4]\n"
    "  parallelism.precision: [fp32, bf16]\n"
    "  parallelism.recompute: [none, full]\n"
    "  parallelism.global_batch: [16, 24]\n"
)


@pytest.mark.parametrize("axes, least_valid, least_invalid", [
    (MIXED_AXES, 50, 50),
    (CAPACITY_AXES, 50, 50),
    ("  moe.experts.d_ff: [32, 64]\n  moe.router.k: [1, 2]\n", 4, 0),  # shared width follows d_ff
    ("  moe.router.type: [topk, noisy_topk, switch, base, sinkhorn, expert_choice, hash, sigmoid_bias]\n"
     "  moe.experts.count: [2, 4]\n  moe.router.k: [1, 2]\n  moe.capacity.factor: [1.0, 2.0]\n  parallelism.ep: [1, 2]\n", 30, 20),
], ids=["routers-placement-parallel", "capacity-shared-precision", "expert-width-alone", "every-router"])  # fmt: skip
def test_fast_path_equals_spec_layer_design_by_design(tmp_path, axes, least_valid, least_invalid):
    """Every design: the vectorised rules accept it iff the spec layer resolves its written-out
    spec, and the batch row equals DesignBatch.from_plans of that resolved plan, field by field."""
    space = DesignSpace(make_sweep(tmp_path, axes))
    chunk = space.chunk(np.arange(space.size))
    not_spec_rules = {c for c, text in enumerate(space.reasons) if text.startswith("duplicate") or "devices" in text}
    checked = {"valid": 0, "invalid": 0}
    for design in range(space.size):
        code = int(chunk.reason[design])
        if code in not_spec_rules:
            continue
        if code != FEASIBLE:
            with pytest.raises(SpecErrors):
                space.design_plan(design)
            checked["invalid"] += 1
            continue
        row = DesignBatch.from_plans([space.design_plan(design)])
        for field in dataclasses.fields(DesignBatch):
            if field.name in ("layers", "encoder"):  # uniform designs: both derive their layer groups from the columns; no encoder part
                assert row.layers is None and chunk.batch.layers is None
                continue
            assert getattr(row, field.name)[0] == getattr(chunk.batch, field.name)[design], (design, field.name)
        checked["valid"] += 1
    assert checked["valid"] >= least_valid and checked["invalid"] >= least_invalid  # both sides exercised


def test_front_and_top_equal_brute_force_over_every_design(tmp_path):
    sweep = make_sweep(tmp_path, MIXED_AXES, objectives="  tokens_per_s: max\n  quality: min\n  memory_per_device: min\n")
    result = explore(sweep, top=7, chunk_size=37, sample_size=10)
    space = DesignSpace(sweep)
    figures, reason = assess(space, space.chunk(np.arange(space.size)), CollectiveCosts(sweep.backend))
    feasible = np.flatnonzero(reason == FEASIBLE)
    values = np.column_stack([figures[o.name][feasible] for o in sweep.objectives])
    costs = to_costs(values, np.array([o.direction == "max" for o in sweep.objectives]))
    assert result.front.ids.tolist() == feasible[dominates_brute(costs)].tolist()
    ranked = sorted(feasible, key=lambda d: (-figures["tokens_per_s"][d], d))[:7]
    assert result.top.ids.tolist() == ranked
    assert result.feasible == len(feasible)
    assert set(result.sample.ids) <= set(feasible) - set(result.front.ids)


def test_chunk_size_changes_nothing(tmp_path):
    sweep = make_sweep(tmp_path, MIXED_AXES)
    one, many = explore(sweep, sample_size=20), explore(sweep, chunk_size=5, sample_size=20)
    assert one.front.ids.tolist() == many.front.ids.tolist()
    assert one.sample.ids.tolist() == many.sample.ids.tolist()
    assert one.infeasible_by_reason == many.infeasible_by_reason


def test_thread_count_changes_nothing(tmp_path):
    """Chunks evaluated on 3 threads (more in flight than threads) fold to the serial result."""
    sweep = make_sweep(tmp_path, MIXED_AXES)
    one = explore(sweep, chunk_size=5, sample_size=20, top=4, threads=1)
    many = explore(sweep, chunk_size=5, sample_size=20, top=4, threads=3)
    assert one.front.ids.tolist() == many.front.ids.tolist() and one.top.ids.tolist() == many.top.ids.tolist()
    assert one.sample.ids.tolist() == many.sample.ids.tolist()
    assert one.infeasible_by_reason == many.infeasible_by_reason and one.feasible == many.feasible
    np.testing.assert_array_equal(one.front.figures["step_s"], many.front.figures["step_s"])


def test_emitted_specs_validate_compile_and_cost_what_the_explorer_said(tmp_path):
    import torch

    from moespec.model.build import build_model
    from moespec.model.counting import count_parameters
    from moespec.sim.model import simulate
    from moespec.spec import load_plan

    sweep = load_sweep(SWEEPS / "cpu-tiny.yaml")
    result = explore(sweep)
    out = tmp_path / "specs"
    run = CliRunner().invoke(app(), ["explore", str(SWEEPS / "cpu-tiny.yaml"), "--emit", str(out), "--json", "--calibration", "none"])
    assert run.exit_code == 0, run.stderr
    files = sorted(out.glob("*.yaml"))
    assert len(files) == len(result.front) > 0
    check = CliRunner().invoke(app(), ["validate", *map(str, files)])
    assert check.exit_code == 0, check.stderr
    for row in result.front.rows():
        plan = load_plan(out / f"cpu-tiny-d{row['design']}.yaml")
        assert plan.parallel.dp == row["dp"] and plan.parallel.ep == row["parallelism.ep"]
        assert plan.moe_layers[0].moe.experts.count == row["moe.experts.count"]
        model = build_model(plan, device="cpu")
        counts = count_parameters(model, plan)
        assert counts.total == row["params_total"] and counts.active == row["params_active"]
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long))  # it runs
        report = simulate(plan, sweep.backend)
        assert math.isclose(report["time"]["step_s"], row["step_s"], rel_tol=RTOL)
        assert math.isclose(report["memory_per_device"]["total_bytes"], row["memory_per_device"], rel_tol=RTOL)


def test_cli_json_and_out_files(tmp_path):
    run = CliRunner().invoke(app(), ["explore", str(SWEEPS / "cpu-tiny.yaml"), "--json", "--top", "3", "--out", str(tmp_path)])
    assert run.exit_code == 0, run.stderr
    document = json.loads(run.stdout)  # exactly one JSON document
    assert document["designs"] == 72 and document["front"] and document["top"]["by"] == "tokens_per_s"
    assert "Clark et al. 2022" in document["quality_proxy_meaning"]
    front = json.loads((tmp_path / "front.json").read_text())
    assert [row["design"] for row in front] == [row["design"] for row in document["front"]]
    lines = (tmp_path / "front.csv").read_text().splitlines()
    assert lines[0].startswith("design,moe.experts.count,moe.router.k") and len(lines) == len(front) + 1
    assert (tmp_path / "sample.csv").exists() and json.loads((tmp_path / "summary.json").read_text())["designs"] == 72
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_cli_table_names_the_front(tmp_path):
    run = CliRunner().invoke(app(), ["explore", str(SWEEPS / "cpu-tiny.yaml")])
    assert run.exit_code == 0, run.stderr
    assert "Pareto front" in run.stdout and "columns: E = moe.experts.count" in run.stdout
    assert "quality = predicted validation loss" in run.stdout


def test_clark2022_law_and_its_data_file():
    data = clark2022()
    assert data["source"]["arxiv"] == "2202.01169" and set(data["fits"]) == {"s_base", "rl_r", "hash"}
    fit = clark_fit("s_base")
    experts = np.array([1, 2, 8, 64, 512, 1e9])
    saturated = fit.saturated_experts(experts)
    assert math.isclose(saturated[0], fit.e_start, rel_tol=1e-12)  # Ê(1) = E_start by construction
    assert np.all(np.diff(saturated) > 0) and saturated[-1] < fit.e_max
    assert math.isclose(saturated[-1], fit.e_max, rel_tol=1e-6)
    # With log10 the fit puts a 1.3B dense model near the paper's losses (~2.2 nats); with
    # natural logs it would say 0.57, below any loss the paper reports: the base is 10.
    assert 2.0 < fit.loss(1.3e9, 1)[()] < 2.5
    losses = fit.loss(np.full(5, 1.0e8), np.array([1, 8, 32, 128, 512]))
    assert np.all(np.diff(losses) < 0)  # more experts help at fixed dense size (in range)


def test_quality_extrapolation_is_flagged(tmp_path):
    result = explore(make_sweep(tmp_path, "  moe.experts.count: [2, 4]\n"))
    assert result.front.figures["quality_extrapolated"].all()  # tiny models: N far below 15M


def test_explorer_never_imports_torch():
    code = ("import sys; from moespec.explore import load_sweep, explore; from moespec.cli import explore_cmd; "
            f"explore(load_sweep({str(SWEEPS / 'cpu-tiny.yaml')!r})); print('torch' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_shipped_sweeps():
    sizes = {path.stem: load_sweep(path).size for path in sorted(SWEEPS.glob("*.yaml"))}
    assert sizes["cpu-tiny"] == 72
    assert sizes["h100-million"] == 1_032_192
    h100 = load_sweep(SWEEPS / "h100-32-experts.yaml")
    assert h100.backend.num_devices == 32
    assert {"moe.experts.count", "moe.router.k", "moe.capacity.factor", "moe.placement", "parallelism.ep"} <= {a.name for a in h100.axes}


def test_explore_is_registered_in_the_app():
    from moespec.cli.app import app as moespec_app

    assert "explore" in {command.name for command in moespec_app.registered_commands}


def test_pipeline_schedule_and_sequence_parallel_axes_take_effect(tmp_path):
    """Parallel fields the base also sets are restored from it per structure; an axis over
    them must still reach the designs (pp_schedule once did not: every design costed 1f1b)."""
    shutil.copy(REPO / "specs" / "tiny-topk.yaml", tmp_path / "base.yaml")
    (tmp_path / "sweep.yaml").write_text("""version: 1
name: t
base: base.yaml
backend: h100-cluster-4n
axes:
  parallelism.pp: [2]
  parallelism.tp: [2]
  parallelism.global_batch: [64]
  parallelism.pp_schedule: [gpipe, interleaved_1f1b]
  parallelism.sequence_parallel: [false, true]
objectives:
  tokens_per_s: max
""")
    space = DesignSpace(load_sweep(tmp_path / "sweep.yaml"))
    chunk = space.chunk(np.arange(space.size))
    assert chunk.batch.pp_schedule.tolist() == [0, 0, 2, 2] and chunk.batch.sequence_parallel.tolist() == [0, 1, 0, 1]
    from moespec.sim.cost import evaluate

    out = evaluate(chunk.batch, space.sweep.backend)
    assert out["bubble_s"][0] > out["bubble_s"][2]  # interleaving divides the bubble by v
    assert out["memory_activations_bytes"][1] < out["memory_activations_bytes"][0]  # sequence parallelism keeps less
    for design in range(space.size):  # the written-out designs resolve with the values costed
        plan = space.design_plan(design)
        assert (plan.parallel.pp_schedule, plan.parallel.sequence_parallel) == (("gpipe", "interleaved_1f1b")[design // 2], bool(design % 2))
