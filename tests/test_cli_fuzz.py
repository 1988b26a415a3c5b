"""A bounded fuzz of every command's flags and file arguments (hypothesis): whatever is given,
the command ends with exit 0, 1 or 2 and never a traceback, a failure says so on stderr, and
`--json` output is strict JSON (no Infinity or NaN). Values are drawn from each flag's edges
(negative, zero, huge, 2**64, inf, nan, tiny) and from broken files; runs that would be valid
and long (many steps, real profiles) are kept out by the strategies, not by the command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_here import run_here
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
INTS = ["-1", "0", "1", "3", "1000000000", str(2**64), "abc", ""]
FLOATS = ["-1", "0", "1e-9", "1e308", "inf", "nan", "0.5", "x"]
FUZZ = settings(max_examples=int(os.environ.get("MOESPEC_FUZZ_EXAMPLES", "15")), derandomize=not os.environ.get("MOESPEC_FUZZ_EXAMPLES"), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fuzz")
    made = {"missing": folder / "missing.yaml", "folder": folder}
    for name, content in {"empty.yaml": b"", "binary.yaml": b"\x00\xff\xfe" * 50, "latin1.yaml": "caf\xe9: 1\n".encode("latin-1"),
                          "list.yaml": b"- 1\n- 2\n", "deep.yaml": b"a: " + b"[" * 2000 + b"]" * 2000 + b"\n",
                          "numbers.yaml": b"version: 1\nname: x\nmodel: {vocab_size: 1e308, d_model: -5}\n"}.items():  # fmt: skip
        (folder / name).write_bytes(content)
        made[name] = folder / name
    return made


def check(done, args) -> None:
    assert done.returncode in (0, 1, 2), (args, done.returncode, done.stderr[-500:])
    assert "Traceback" not in done.stderr, (args, done.stderr[-1500:])
    if "--json" in args and done.stdout.strip():  # a --json failure may be told as a JSON document (validate's errors)
        json.loads(done.stdout, parse_constant=lambda name: pytest.fail(f"{args}: --json printed {name}"))
    if done.returncode:
        assert done.stderr.strip() or ("--json" in args and done.stdout.strip()), (args, "failed without saying why")


def spec_files(files):
    return st.sampled_from([SPECS / "tiny-topk.yaml", SPECS / "tiny-ep.yaml", SPECS / "mixtral-8x7b.yaml", *files.values()])


@FUZZ
@given(data=st.data())
def test_spec_commands(files, data):
    spec = data.draw(spec_files(files))
    command = data.draw(st.sampled_from(["validate", "show", "compile", "simulate"]))
    args = [command, str(spec)]
    if command == "compile":
        args += ["--device", data.draw(st.sampled_from(["meta", "gpu", ""]))]
    if command == "simulate":
        args += ["--backend", data.draw(st.sampled_from(["cpu-local", "dgx-h100", "nope", str(files["empty.yaml"])]))]
        for flag in data.draw(st.lists(st.sampled_from(["--world", "--ep", "--imbalance", "--overlap"]), unique=True, max_size=3)):
            args += [flag, data.draw(st.sampled_from(INTS + FLOATS))]
    if data.draw(st.booleans()):
        args.append("--json")
    check(run_here(*args), args)


@FUZZ
@given(data=st.data())
def test_train_flags(files, data):
    spec = data.draw(spec_files(files))
    args = ["train", str(spec), "--steps", data.draw(st.sampled_from(["-1", "0", "1", str(2**64), "x"]))]
    for flag, values in {"--lr": FLOATS, "--seed": INTS, "--batch": ["-1", "0", "1", "1000000000", str(2**64)], "--timeout": FLOATS,
                         "--eval-every": INTS, "--nproc": ["0", "-1", "3", "1000000000"], "--val-fraction": FLOATS,
                         "--save-every": INTS, "--data": [str(p) for p in files.values()], "--device": ["cuda", "tpu"],
                         "--nnodes": INTS, "--resume": [str(files["folder"]), str(files["missing"])]}.items():  # fmt: skip
        if data.draw(st.booleans()):
            args += [flag, data.draw(st.sampled_from(values))]
    if data.draw(st.booleans()):
        args.append("--json")
    check(run_here(*args), args)


@FUZZ
@given(data=st.data())
def test_explore_profile_and_calibrate_flags(files, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    command = data.draw(st.sampled_from(["explore", "profile", "calibrate"]))
    if command == "explore":
        sweep = data.draw(st.sampled_from([SPECS / "sweeps" / "cpu-tiny.yaml", *files.values()]))
        args = ["explore", str(sweep)]
        flags = {"--chunk": INTS, "--top": INTS, "--sample": INTS, "--show": INTS, "--budget": INTS, "--seed": INTS,
                 "--by": ["quality", "nope"], "--out": [str(files["empty.yaml"]), str(out)], "--calibration": ["none", str(files["binary.yaml"])]}  # fmt: skip
    elif command == "profile":
        args = ["profile", str(data.draw(spec_files(files))), "--steps", data.draw(st.sampled_from(["-1", "0", "2", str(2**64)]))]
        flags = {"--threads": INTS, "--warmup": INTS, "--trace-steps": INTS, "--timeout": FLOATS, "--nproc": INTS,
                 "--device": ["cuda", "x"], "--out": [str(files["empty.yaml"])], "--backend": ["nope", str(files["latin1.yaml"])]}  # fmt: skip
    else:
        args = ["calibrate", "--backend", data.draw(st.sampled_from(["nope", str(files["empty.yaml"]), str(files["deep.yaml"])]))]
        flags = {"--threads": INTS, "--nproc": INTS, "--timeout": FLOATS, "--out": [str(files["folder"])]}
    for flag, values in flags.items():
        if data.draw(st.booleans()):
            args += [flag, data.draw(st.sampled_from(values))]
    if data.draw(st.booleans()):
        args.append("--json")
    check(run_here(*args), args)
