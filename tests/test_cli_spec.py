"""The spec commands as a user runs them: real processes, exit codes, stdout/stderr contracts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def moespec(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "moespec", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_validate_all_examples_ok():
    specs = sorted(str(p) for p in (ROOT / "specs").glob("*.yaml"))
    result = moespec("validate", *specs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(specs)


def test_validate_bad_spec_one_line_per_error_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\nmodel:\n  vocab_size: 10\n  d_modle: 8\n  n_layers: 2\n  n_heads: 2\n")
    result = moespec("validate", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert f"{bad}:3:1: model: missing required key 'd_model' in 'model'; add it" in lines
    assert f"{bad}:5:3: model.d_modle: unknown key 'd_modle'; did you mean 'd_model'?" in lines
    assert "Traceback" not in result.stderr + result.stdout


def test_validate_json_is_one_document(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\nmodel: {vocab_size: 10, d_model: 8, n_layers: 2, n_heads: 3}\n")
    result = moespec("validate", "--json", str(ROOT / "specs/tiny-topk.yaml"), str(bad))
    assert result.returncode == 2
    document = json.loads(result.stdout)
    assert document["valid"] is False
    good, wrong = document["files"]
    assert good["valid"] and good["moe_layers"] == 2 and good["routers"] == ["topk"]
    assert wrong["errors"] == [
        {
            "file": str(bad),
            "line": 3,
            "col": 50,
            "path": "model.n_heads",
            "message": "n_heads (3) does not divide d_model (8); pick n_heads dividing d_model or set model.head_dim",
        }
    ]


@pytest.mark.parametrize("target", ["specs", "missing.yaml"])
def test_validate_directory_or_missing_file(target):
    result = moespec("validate", target)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_show_json_is_the_plan():
    from moespec.spec import load_plan

    result = moespec("show", "--json", "specs/tiny-mixed.yaml")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == load_plan(ROOT / "specs/tiny-mixed.yaml").to_dict()


def test_show_table_names_every_layer_kind():
    result = moespec("show", "--every-layer", "specs/tiny-mixed.yaml")
    assert result.returncode == 0, result.stderr
    assert "moe (base)" in result.stdout and "switch" in result.stdout and "dense" in result.stdout
    assert "cf 1.25/2 C=" in result.stdout and "(probability)" in result.stdout


@pytest.mark.parametrize("spec,words", [
    ("tiny-oss", ["attention sinks", "sliding window 32 in layers [0, 2]", "biases on q/k/v, o_proj"]),
    ("tiny-mla", ["MLA (q_lora_rank 32, kv_lora_rank 24, qk 16+8 rope, v 16)"]),
    ("olmoe-1b-7b", ["QK-norm full"]),
])  # fmt: skip
def test_show_names_the_attention_features(spec, words):
    result = moespec("show", f"specs/{spec}.yaml")
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    assert all(word in flat for word in words), result.stdout
    assert "attention:" not in moespec("show", "specs/tiny-topk.yaml").stdout  # a plain block says nothing more


def test_schema_command_prints_the_schema():
    result = moespec("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout)["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_wheel_ships_the_schemas(tmp_path):
    """A non-editable install must find its schemas without the source tree."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # --no-build-isolation builds with this environment's setuptools (the build backend
    # pyproject names); without it the build fails here, as it would for a user.
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("moespec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "moespec/schemas/moespec.schema.json" in names and "moespec/schemas/backend.schema.json" in names
    assert "moespec/backends/dgx-h100.yaml" in names and "moespec/data/python_docs_topics.txt" in names
    assert {"moespec/schemas/sweep.schema.json", "moespec/schemas/calibration.schema.json",
            "moespec/calibrations/cpu-local.json", "moespec/explore/clark2022.yaml"} <= set(names)  # fmt: skip
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    check = subprocess.run(
        [sys.executable, "-c", "import moespec.spec.schema as s; print(s.__file__); print(len(s.load_schema()['$defs'])); "
         "from moespec.sim.calibration import shipped_calibration, load_calibration; "
         "print(load_calibration(shipped_calibration('cpu-local'))['backend'])"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    module_file, n_defs, calibrated = check.stdout.split()
    assert module_file.startswith(str(site)) and int(n_defs) > 10 and calibrated == "cpu-local"
