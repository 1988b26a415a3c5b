"""Property tests: no input makes the spec layer fail with anything but located one-line errors.

For any text (random YAML-ish tokens, random unicode, random bytes in a file, or an example
spec mutated a few times), `plan_from_text` / `load_plan` either returns a `SpecPlan` whose
`to_dict()` is plain JSON, or raises `SpecErrors` whose every error formats to
`spec.yaml:LINE:COL: PATH: message` on one line, with LINE inside the text. Never another
exception, and never the "please report it" fallback that stands for a bug in resolve.py.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from typer.testing import CliRunner

from moespec.cli.app import app  # imported plainly: a CLI that does not import fails this file
from moespec.spec import SpecErrors, SpecPlan, load_plan, plan_from_text
from moespec.spec.schema import load_schema

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.yaml"))
SPEC_TEXTS = [path.read_text() for path in SPECS]

# derandomize: the same examples on every run, so CI cannot flake on a lucky draw.
FUZZ = settings(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _schema_words() -> list[str]:
    """Every property name and enum value in the schema: mutations that are nearly valid."""
    words: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            words.update(k for k in node.get("properties", {}))
            words.update(v for v in node.get("enum", []) if isinstance(v, str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(load_schema())
    return sorted(words)


WORDS = _schema_words()


def check(text: str, file: str = "spec.yaml") -> SpecPlan | None:
    """The property itself; returns the plan when the text is a valid spec."""
    try:
        plan = plan_from_text(text, file)
    except SpecErrors as exc:
        check_errors(exc, file, max_line=len(text.splitlines()) + 1)
        return None
    json.dumps(plan.to_dict(), allow_nan=False)  # plain, finite JSON
    return plan


def check_errors(exc: SpecErrors, file: str, max_line: int) -> None:
    assert exc.errors, "SpecErrors without an error"
    for error in exc.errors:
        line = error.format()
        assert line.startswith(f"{file}:{error.line}:{error.col}: {error.path}: "), line
        assert len(line.splitlines()) == 1 and "\n" not in line and "\r" not in line, repr(line)
        assert 1 <= error.line <= max_line and error.col >= 1, line
        assert error.message.strip(), line
        assert "please report it" not in error.message, line  # resolve.py hit an internal error


# --- (a) random text and bytes -----------------------------------------------------------

TOKENS = [
    *WORDS[:: max(len(WORDS) // 40, 1)],
    "version", "name", "model", "moe", "router", "type", "k", "experts", "count", "layers",
    ":", ": ", " ", "  ", "\n", "\n  ", "- ", "{", "}", "[", "]", ", ", "&a ", "*a", "<<: ", "!!int ",
    "!!bool ", "!!float ", "!!binary ", "!!timestamp ", "!!set ", "!tag ", "'", '"', "# c", "\t", "1",
    "-1", "0", "2.5", "1e400", "1e-5", ".nan", ".inf", "~", "null", "true", "---\n", "...\n", "? ",
    "|\n", ">-\n", "%YAML 1.1\n", "@", "`", "\x00", "\ufeff", "\r", "\u2028", "é", "9" * 50, "\\",
]  # fmt: skip
yamlish = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5)), max_size=60).map("".join)


@settings(FUZZ, max_examples=1000)
@given(text=st.one_of(yamlish, st.text(max_size=300)))
def test_random_text_gives_a_plan_or_located_errors(text):
    check(text)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


@settings(FUZZ, max_examples=300)
@given(raw=st.one_of(st.binary(max_size=300), yamlish.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_random_bytes_in_a_file(raw, scratch):
    path = scratch / "spec.yaml"
    path.write_bytes(raw)
    try:
        plan = load_plan(path)
    except SpecErrors as exc:
        check_errors(exc, str(path), max_line=len(raw.decode("utf-8", "replace").splitlines()) + 1)
    else:
        json.dumps(plan.to_dict(), allow_nan=False)


# --- (b) mutations of the example specs ----------------------------------------------------

SMALL_INTS = [-1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 64, 1000]
scalars = st.one_of(
    st.sampled_from(SMALL_INTS),
    st.sampled_from(WORDS),
    st.sampled_from([None, True, False, 2.5, 0.5, 1e-9, 10**30, -(10**30), math.inf, math.nan, "", "x y"]),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
)
values = st.recursive(
    st.one_of(st.sampled_from(SMALL_INTS), scalars),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(WORDS), st.text(max_size=6)), inner, max_size=4),
    ),
    max_leaves=8,
)
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")
# Small counts make the cross-field rules (divisibility, k vs E, ranges) fire; the rest are
# out-of-range, non-finite, unreadable or wrongly typed.
NUMBER_SWAPS = ["1", "2", "3", "4", "6", "8", "16", "0", "-3", "2.5", "1.0e400", "-.inf", ".nan", str(10**30), "9" * 5000, "1e3", "true", "[]"]


def _paths(data, prefix=()):
    """Every (container path, key) in parsed YAML data, mappings and lists alike."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            found.append((prefix, key))
            found.extend(_paths(value, prefix + (key,)))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found.append((prefix, index))
            found.extend(_paths(value, prefix + (index,)))
    return found


def _at(data, path):
    for part in path:
        data = data[part]
    return data


def _structural(text: str, draw, kind: str) -> str:
    try:
        data = yaml.safe_load(text)
    except Exception:  # the harness's own parse (e.g. a 5000-digit int); the text is still fuzzed as is
        return text
    if not isinstance(data, dict):
        return text
    paths = _paths(data)
    if kind == "insert":
        mappings = [()] + [prefix + (key,) for prefix, key in paths if isinstance(_at(data, prefix + (key,)), dict)]
        target = _at(data, draw(st.sampled_from(mappings)))
        target[draw(st.one_of(st.sampled_from(WORDS), st.text(min_size=1, max_size=8)))] = draw(values)
    elif paths:
        prefix, key = draw(st.sampled_from(paths))
        container = _at(data, prefix)
        if kind == "delete":
            del container[key]
        else:
            container[key] = draw(values)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _textual(text: str, draw, kind: str) -> str:
    lines = text.splitlines(keepends=True)
    if kind == "number":
        numbers = list(NUMBER.finditer(text))
        if numbers:
            match = draw(st.sampled_from(numbers))
            return text[: match.start()] + draw(st.sampled_from(NUMBER_SWAPS)) + text[match.end() :]
        return text
    if kind == "dup-line" and lines:
        index = draw(st.integers(0, len(lines) - 1))
        return "".join(lines[: index + 1] + lines[index:])
    if kind == "drop-char" and text:
        index = draw(st.integers(0, len(text) - 1))
        return text[:index] + text[index + 1 :]
    return text


MUTATIONS = ["delete", "replace", "insert", "number", "dup-line", "drop-char"]


@st.composite
def mutated_specs(draw) -> str:
    text = draw(st.sampled_from(SPEC_TEXTS))
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        if kind in ("delete", "replace", "insert"):
            text = _structural(text, draw, kind)
        else:
            text = _textual(text, draw, kind)
    return text


@settings(FUZZ, max_examples=1000)
@given(text=mutated_specs())
def test_mutated_examples_give_a_plan_or_located_errors(text):
    check(text)


def test_unmutated_examples_are_plans():
    for path, text in zip(SPECS, SPEC_TEXTS):
        assert check(text, path.name) is not None, path


# --- (c) the CLI path ---------------------------------------------------------------------


@settings(FUZZ, max_examples=40)
@given(texts=st.lists(mutated_specs(), min_size=1, max_size=3))
def test_cli_validate_exits_0_or_2_without_traceback(texts):
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for number, text in enumerate(texts):
            path = Path(folder) / f"mutant-{number}.yaml"
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
            paths.append(str(path))
        result = CliRunner().invoke(app, ["validate", *paths])
    output = result.stdout + (result.stderr or "")
    assert result.exit_code in (0, 2), output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output
    valid = [check(text) is not None for text in texts]
    assert result.exit_code == (0 if all(valid) else 2), output
