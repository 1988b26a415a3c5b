"""The JSON Schemas shipped in the wheel, and their errors turned into located one-liners.

jsonschema reports in its own words ("Additional properties are not allowed ('kk' was
unexpected)"); a user wants the line of the offending key, what is wrong and the fix, with a
"did you mean" for typos. Every error is collected, not the first.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema

from moespec.spec.errors import PathT, SpecError, SpecErrors
from moespec.spec.yaml_source import Locations, parse_yaml

SCHEMA_FILES = {
    "spec": "moespec.schema.json",
    "backend": "backend.schema.json",
    "sweep": "sweep.schema.json",
    "calibration": "calibration.schema.json",
}


@functools.cache
def load_schema(kind: str = "spec") -> dict:
    """A shipped schema by kind; works from the wheel (moespec.schemas) or a source checkout."""
    name = SCHEMA_FILES[kind]
    try:
        text = resources.files("moespec.schemas").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        text = (Path(__file__).resolve().parents[2] / "schemas" / name).read_text()
    return json.loads(text)


def _ecma_pattern(validator, pattern: str, instance, schema):
    """`pattern` as JSON Schema means it (ECMA-262), where `$` is the end of the string; Python's
    `$` also matches before a final newline, so `name: "tiny\\n"` would pass ^...$."""
    if not validator.is_type(instance, "string"):
        return
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + "\\Z"
    if not re.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _ecma_pattern})


@functools.cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    return _Validator(load_schema(kind))


def definition_defaults(name: str, kind: str = "spec") -> dict:
    """Defaults of one `$defs` object, e.g. definition_defaults('router_topk') -> {'type': 'topk', 'k': 2, ...}."""
    properties = load_schema(kind)["$defs"][name]["properties"]
    return {key: prop["default"] for key, prop in properties.items() if "default" in prop}


def schema_errors(data: object, locations: Locations, kind: str = "spec") -> list[SpecError]:
    errors: dict[SpecError, None] = {}  # ordered set: a null router fails each if/then branch alike
    for error in _validator(kind).iter_errors(data):
        errors.update(dict.fromkeys(_translate(error, locations)))
    return list(errors)


def parse_checked(text: str, file: str, kind: str, *, not_a_mapping: str) -> tuple[dict, Locations]:
    """Parse a document and check it against its schema: the first step of loading every kind
    of file (spec, backend, sweep, calibration). Raises SpecErrors with every located error;
    `not_a_mapping` tells the user what the top level should look like."""
    data, locations = parse_yaml(text, file, kind)
    if not isinstance(data, dict):
        raise SpecErrors([locations.error((), not_a_mapping)])
    errors = schema_errors(data, locations, kind)
    if errors:
        raise SpecErrors(errors)
    return data, locations


def suggest(word: str, options, section: str = "") -> str:
    word, options = str(word), [str(o) for o in options]
    # `capacity: {capacity_factor: ...}` repeats the section's name; the bare key is meant.
    for prefix in (f"{section}_", f"{section.rstrip('s')}_") if section else ():
        if word.startswith(prefix) and word[len(prefix) :] in options:
            return f"; did you mean {word[len(prefix):]!r}?"
    matches = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {matches[0]!r}?" if matches else ""


_ONE_EXPERT = "routes each token to exactly one expert, so it takes no k; remove k (or use router type topk for k > 1)"
_KEY_HINTS = {
    ("base", "k"): f"base {_ONE_EXPERT}",
    ("switch", "k"): f"switch {_ONE_EXPERT}",
    ("hash", "k"): f"hash {_ONE_EXPERT}",
    ("sinkhorn", "k"): f"sinkhorn {_ONE_EXPERT}",
    ("expert_choice", "k"): "expert_choice has no per-token k: each expert picks C = T * capacity.factor / E tokens; remove k and set capacity.factor",
    ("base", "capacity"): "BASE layers have no capacity; remove it",
}

_TYPE_WORDS = {
    "integer": "a whole number",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping (key: value lines)",
    "array": "a list",
    "null": "null",
}


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _translate(error: jsonschema.ValidationError, locations: Locations) -> list[SpecError]:
    path: PathT = tuple(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extras = [key for key in error.instance if key not in schema.get("properties", {})]
        variant = error.instance.get("type") if isinstance(error.instance, dict) else None
        variant = variant if isinstance(variant, str) else None  # `type: []` is unhashable
        section = path[-1] if path and isinstance(path[-1], str) else ""
        return [
            locations.error(
                path + (key,),
                _KEY_HINTS.get((variant, key))
                or f"unknown key {key!r}{suggest(key, allowed, section) or f'; allowed here: {_list(allowed)}'}",
            )
            for key in extras
        ]
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else str(error.validator_value)
        where = f" in {path[-1]!r}" if path else ""
        return [locations.error(path, f"missing required key {missing!r}{where}; add it")]
    if kind == "type":
        expected = error.validator_value
        expected = expected if isinstance(expected, list) else [expected]
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in expected)
        return [locations.error(path, f"expected {words}, got {_describe(error.instance)}; write {words} here", key=False)]
    if kind == "enum":
        options = error.validator_value
        hint = suggest(error.instance, options) if isinstance(error.instance, str) else ""
        return [locations.error(path, f"{_describe(error.instance)} is not one of {_list(options)}{hint or '; pick one of those'}", key=False)]
    if kind == "const":
        return [locations.error(path, f"must be {error.validator_value!r}, got {_describe(error.instance)}; set it to {error.validator_value!r}", key=False)]
    bounds = {
        "minimum": ">=",
        "maximum": "<=",
        "exclusiveMinimum": ">",
        "exclusiveMaximum": "<",
    }
    if kind in bounds:
        return [
            locations.error(
                path,
                f"must be {bounds[kind]} {error.validator_value}, got {error.instance}; choose a value {bounds[kind]} {error.validator_value}",
                key=False,
            )
        ]
    if kind == "minItems":
        return [locations.error(path, f"needs at least {error.validator_value} item(s); add them", key=False)]
    if kind == "uniqueItems":
        return [locations.error(path, "has repeated items; list each once", key=False)]
    if kind == "pattern":
        return [locations.error(path, f"{_describe(error.instance)} does not match {error.validator_value}; use letters, digits, '.', '_' and '-'", key=False)]
    if kind == "maxLength":
        return [locations.error(path, f"is longer than {error.validator_value} characters; shorten it", key=False)]
    return [locations.error(path, f"{error.message}; fix this value", key=False)]


def _list(options) -> str:
    return ", ".join(str(option) for option in options)
