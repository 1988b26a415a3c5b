"""Bad sweeps and the located line each one gets (`sweep.yaml:LINE:COL: PATH: message`).

Every case starts from BASE (line numbers on the right) and changes one thing. The CLI must
print the lines on stderr and exit 2 without a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from moespec.cli import explore_cmd
from moespec.explore import load_sweep
from moespec.spec import SpecErrors

REPO = Path(__file__).resolve().parents[1]

# fmt: off
BASE = (
    "version: 1\n"                                            # 1
    "name: errs\n"                                            # 2
    "base: base.yaml\n"                                       # 3
    "backend: cpu-local\n"                                    # 4
    "axes:\n"                                                 # 5
    "  moe.experts.count: [2, 4]\n"                           # 6
    "  moe.router.k: {start: 1, stop: 2}\n"                   # 7
    "  parallelism.ep: {start: 1, stop: 2, factor: 2}\n"      # 8
    "objectives:\n"                                           # 9
    "  tokens_per_s: max\n"                                   # 10
    "  quality: min\n"                                        # 11
)
# fmt: on

# (id, (old, new), line, col, path, message fragment)
CASES = [
    ("unknown-top-key", ("objectives:", "objetives:"), 9, 1, "objetives", "did you mean 'objectives'?"),
    ("bad-axis-path", ("moe.experts.count", "moe.experts.cont"), 6, 3, "axes['moe.experts.cont']", "did you mean 'count'?"),
    ("not-a-design-path", ("moe.experts.count", "training.lr"), 6, 3, "axes['training.lr']", "under model., moe. or parallelism."),
    ("path-through-a-value", ("moe.experts.count", "moe.experts.count.max"), 6, 3, "axes['moe.experts.count.max']", "is a value, not a mapping"),
    ("overrides-axis", ("moe.experts.count", "moe.overrides"), 6, 3, "axes['moe.overrides']", "cannot be an axis"),
    ("range-backwards", ("{start: 1, stop: 2}", "{start: 3, stop: 2}"), 7, 17, "axes['moe.router.k']", "stop (2) is below start (3)"),
    ("range-step-and-factor", ("factor: 2}", "factor: 2, step: 1}"), 8, 19, "axes['parallelism.ep']", "step (linear) or factor (log), not both"),
    ("log-range-from-zero", ("{start: 1, stop: 2, factor: 2}", "{start: 0, stop: 2, factor: 2}"), 8, 19, "axes['parallelism.ep']", "needs start > 0"),
    ("log-factor-one", ("factor: 2}", "factor: 1}"), 8, 47, "axes['parallelism.ep'].factor", "must be > 1"),
    ("linear-step-zero", ("{start: 1, stop: 2}", "{start: 1, stop: 2, step: 0}"), 7, 43, "axes['moe.router.k'].step", "must be > 0"),
    ("range-unknown-key", ("{start: 1, stop: 2}", "{start: 1, stop: 2, base: 2}"), 7, 37, "axes['moe.router.k'].base", "unknown key 'base'"),
    ("empty-axis", ("[2, 4]", "[]"), 6, 22, "axes['moe.experts.count']", "needs at least 1 item"),
    ("repeated-value", ("[2, 4]", "[2, 2]"), 6, 22, "axes['moe.experts.count']", "lists a value twice"),
    ("value-below-minimum", ("[2, 4]", "[0, 4]"), 6, 23, "axes['moe.experts.count'][0]", "must be >= 1"),
    ("value-wrong-type", ("[2, 4]", "[2, four]"), 6, 26, "axes['moe.experts.count'][1]", "expected integer"),
    ("enum-typo", ("moe.experts.count: [2, 4]", "moe.router.type: [topk, swich]"), 6, 27, "axes['moe.router.type'][1]", "did you mean 'switch'?"),
    ("mapping-value-typo", ("moe.experts.count: [2, 4]", "moe.router: [{type: topk, kk: 2}]"), 6, 16, "axes['moe.router'][0]", "unknown key 'kk' for moe.router; did you mean 'k'?"),
    ("unknown-objective", ("tokens_per_s: max", "tokens_per_sec: max"), 10, 3, "objectives.tokens_per_sec", "did you mean 'tokens_per_s'?"),
    ("bad-direction", ("tokens_per_s: max", "tokens_per_s: most"), 10, 17, "objectives.tokens_per_s", "is not one of max, min"),
    ("quality-direction", ("quality: min", "quality: max"), 11, 12, "objectives.quality", "write quality: min"),
    ("unknown-backend", ("cpu-local", "cpu-locl"), 4, 10, "backend", "did you mean 'cpu-local'?"),
    ("missing-base", ("base.yaml", "nope.yaml"), 3, 1, "base", "no spec file at"),
    ("unknown-constraint", ("objectives:", "constraints: {max_memory_gib: 3}\nobjectives:"), 9, 15, "constraints.max_memory_gib", "unknown key"),
]


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    shutil.copy(REPO / "specs" / "tiny-topk.yaml", tmp_path / "base.yaml")
    return tmp_path


def write(sweep_dir: Path, text: str) -> Path:
    path = sweep_dir / "sweep.yaml"
    path.write_text(text)
    return path


def test_base_sweep_is_valid(sweep_dir):
    sweep = load_sweep(write(sweep_dir, BASE))
    assert sweep.size == 2 * 2 * 2
    assert [axis.values for axis in sweep.axes] == [(2, 4), (1, 2), (1, 2)]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_sweep_gets_one_located_line(sweep_dir, case):
    _, (old, new), line, col, path, fragment = case
    assert old in BASE
    file = write(sweep_dir, BASE.replace(old, new, 1))
    with pytest.raises(SpecErrors) as raised:
        load_sweep(file)
    lines = [error.format() for error in raised.value.errors]
    prefix = f"{file}:{line}:{col}: {path}: "
    assert any(text.startswith(prefix) and fragment in text for text in lines), lines


def explore_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("explore")(explore_cmd.explore_command)
    app.command("other")(lambda: None)  # two commands: the subcommand name stays explicit
    return app


@pytest.mark.parametrize("case", CASES[:6] + CASES[-5:], ids=[case[0] for case in CASES[:6] + CASES[-5:]])
def test_cli_prints_the_lines_and_exits_2_without_traceback(sweep_dir, case):
    _, (old, new), line, col, path, fragment = case
    file = write(sweep_dir, BASE.replace(old, new, 1))
    result = CliRunner().invoke(explore_app(), ["explore", str(file), "--json"])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""  # --json: nothing on stdout when there is no answer
    assert f"{file}:{line}:{col}: {path}: " in result.stderr
    assert "Traceback" not in result.stderr
    assert isinstance(result.exception, SystemExit)  # typer.Exit(2), nothing raised past it


@pytest.mark.parametrize("text, fragment", [
    ("", "the file is empty"),
    ("- a\n- b\n", "a sweep is a mapping"),
    ("version: 1\nname: x\n  bad: indent\n", "invalid YAML"),
])  # fmt: skip
def test_not_a_sweep(sweep_dir, text, fragment):
    with pytest.raises(SpecErrors) as raised:
        load_sweep(write(sweep_dir, text))
    assert fragment in str(raised.value)


def test_missing_sweep_file_is_one_line(tmp_path):
    result = CliRunner().invoke(explore_app(), ["explore", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert result.stderr.strip().endswith("no such file; check the path")
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_cli_options_exit_2(sweep_dir):
    file = write(sweep_dir, BASE)
    for args, fragment in ((["--by", "speed"], "--by 'speed' is not a figure"), (["--x", "mfu"], "--x and --y go together")):
        result = CliRunner().invoke(explore_app(), ["explore", str(file), *args])
        assert result.exit_code == 2 and fragment in result.stderr, result.stderr


def test_every_sweep_schema_property_is_documented():
    from moespec.spec.schema import load_schema

    def walk(node, where):
        if isinstance(node, dict):
            for key, prop in node.get("properties", {}).items():
                assert "description" in prop and "default" in prop, f"{where}.{key} lacks a description or default"
            for key, child in node.items():
                walk(child, f"{where}.{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{where}[{index}]")

    walk(load_schema("sweep"), "sweep")


def test_shipped_sweeps_name_their_schema():
    for path in sorted((REPO / "specs" / "sweeps").glob("*.yaml")):
        assert path.read_text().startswith("# yaml-language-server: $schema=../../schemas/sweep.schema.json"), path
