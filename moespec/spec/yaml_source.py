"""Read a spec file into plain Python data, remembering where every key and value was written.

PyYAML's `safe_load` forgets positions and expands aliases without limit, so we compose the
node graph ourselves and construct values with a budget: a billion-laughs anchor bomb, a
recursive alias, a 5000-digit integer or binary garbage each end as one located error,
never a hang or a traceback.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from moespec.spec.errors import PathT, SpecError, SpecErrors, format_path

MAX_FILE_BYTES = 1 << 20  # a spec is a page of YAML; 1 MiB leaves a thousandfold margin
MAX_NODES = 100_000  # constructed values, aliases counted each time they are expanded
MAX_DEPTH = 64
MAX_INT_DIGITS = 100  # spec integers are counts and sizes; Python 3.11+ will not read > 4300 digits

# YAML 1.2 floats with an exponent. PyYAML follows YAML 1.1, where `1e-5` (no dot) and `1.0e400` (unsigned
# exponent) are strings, so `norm_eps: 1e-5` would fail as "expected a number, got str".
FLOAT_12 = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+")
_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"
_SYNTAX_HINTS = [  # (sign in PyYAML's problem text, the fix to suggest)
    ("another document", "a spec is one YAML document: remove this '---' and what follows, or split the file"),
    ("'\\t'", "indent with spaces, not tabs"),
]
_TYPE_NAMES = {"NoneType": "null", "bool": "a boolean", "int": "an integer", "float": "a number"}


@dataclass
class Locations:
    """Where each path was written: the key's position and the value's (1-based line, col)."""

    file: str
    keys: dict[PathT, tuple[int, int]] = field(default_factory=dict)
    values: dict[PathT, tuple[int, int]] = field(default_factory=dict)

    def of(self, path: PathT, *, key: bool = True) -> tuple[int, int]:
        """Position of `path`, or of its nearest written ancestor (for defaults and missing keys)."""
        path = tuple(path)
        while path:
            table = (self.keys, self.values) if key else (self.values, self.keys)
            for positions in table:
                if path in positions:
                    return positions[path]
            path = path[:-1]
        return self.values.get((), (1, 1))

    def error(self, path: PathT, message: str, *, key: bool = True) -> SpecError:
        line, col = self.of(path, key=key)
        return SpecError(self.file, line, col, format_path(path), message)


EMPTY = {  # what an empty file of each kind should have held
    "spec": "a spec needs at least version, name and model",
    "backend": "a backend needs at least version, name, device and nodes (see backends/*.yaml)",
    "sweep": "a sweep needs at least version, name, base, backend and axes (see specs/sweeps/*.yaml)",
    "calibration": "a calibration is the JSON object `moespec calibrate` writes",
}


def read_spec_text(path: Path, kind: str = "spec") -> str:
    """The file's text, or a one-line SpecErrors for anything that is not a readable file of
    this kind (spec, backend, sweep, calibration: each is a page of YAML or JSON)."""
    name = str(path)

    def fail(message: str) -> SpecErrors:
        return SpecErrors([SpecError(name, 1, 1, "(root)", message)])

    path = Path(path)
    try:
        if path.is_dir():
            raise fail(f"is a directory, not a {kind} file; pass a {'.json' if kind == 'calibration' else '.yaml'} file inside it")
        if not path.exists():
            raise fail("no such file; check the path")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise fail(f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for a {kind}; is it the right file?")
        raw = path.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read the file ({exc.strerror or exc}); check its permissions") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecErrors(
            [SpecError(name, line, col, "(root)", f"byte 0x{raw[exc.start]:02x} is not UTF-8 text; a {kind} is a UTF-8 text file")]
        ) from None


def parse_yaml(text: str, file: str, kind: str = "spec") -> tuple[object, Locations]:
    """Compose one YAML document and construct it with positions; raises SpecErrors."""
    locations = Locations(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context:  # where the construct began: an unclosed `{` is found lines later
            where = f" on line {exc.context_mark.line + 1}" if exc.context_mark else ""
            problem = f"{exc.problem} ({exc.context}{where})"
        hint = next((fix for sign, fix in _SYNTAX_HINTS if sign in problem), "fix the syntax here")
        raise SpecErrors([SpecError(file, line, col, "(root)", f"invalid YAML: {problem}; {hint}")]) from None
    except yaml.reader.ReaderError as exc:  # a control character (NUL, ...) anywhere in the text
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        shown = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise SpecErrors([SpecError(file, line, col, "(root)", f"character {shown} is not allowed in YAML; remove it (is this a text file?)")]) from None
    except yaml.YAMLError as exc:
        raise SpecErrors([SpecError(file, 1, 1, "(root)", f"invalid YAML: {exc}; fix the syntax")]) from None
    except RecursionError:
        raise SpecErrors([SpecError(file, 1, 1, "(root)", "YAML nested too deeply; flatten the document")]) from None
    if root is None:
        raise SpecErrors([SpecError(file, 1, 1, "(root)", f"the file is empty; {EMPTY.get(kind, EMPTY['spec'])}")])
    builder = _Builder(locations)
    data = builder.build(root, (), 0)
    if builder.errors:
        raise SpecErrors(builder.errors)
    return data, locations


def _position(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    """Turns composed nodes into dicts, lists and scalars, with a node budget and positions."""

    def __init__(self, locations: Locations):
        self.locations = locations
        self.constructor = SafeConstructor()
        self.visited = 0
        self.errors: list[SpecError] = []

    def _error(self, node: Node, path: PathT, message: str) -> None:
        line, col = _position(node)
        self.errors.append(SpecError(self.locations.file, line, col, format_path(path), message))

    def build(self, node: Node, path: PathT, depth: int):
        self.visited += 1
        if self.visited > MAX_NODES:
            if self.visited == MAX_NODES + 1:
                self._error(node, path, f"document expands to over {MAX_NODES} values (an anchor/alias bomb?); remove the repeated aliases")
            return None
        if depth > MAX_DEPTH:
            self._error(node, path, f"nested deeper than {MAX_DEPTH} levels (a recursive alias?); flatten it")
            return None
        self.locations.values.setdefault(path, _position(node))
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, SequenceNode):
            return [self.build(item, path + (index,), depth + 1) for index, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            return self._mapping(node, path, depth)
        self._error(node, path, "unsupported YAML node; use plain mappings, lists and scalars")
        return None

    def _scalar(self, node: ScalarNode, path: PathT):
        digits = sum(ch.isdigit() for ch in node.value) if node.tag == _INT_TAG else 0
        if digits > MAX_INT_DIGITS:  # checked before reading: the same error on every Python
            self._error(node, path, f"an integer with {digits} digits is far too large; use a smaller value")
            return None
        if node.tag == _STR_TAG and node.style is None and FLOAT_12.fullmatch(node.value):
            value = float(node.value)  # a plain `1e-5`: a number in YAML 1.2, a string to PyYAML
        else:
            try:
                value = self.constructor.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or str(exc)
                self._error(node, path, f"cannot read this value: {problem}; use a plain string, number or boolean")
                return None
            except (ValueError, LookupError, AttributeError, TypeError):
                # PyYAML's constructors raise these for values their tag cannot hold
                # (`!!bool maybe`, `!!int ''`, `!!timestamp x`).
                shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
                tag = node.tag.rsplit(":", 1)[-1]
                self._error(node, path, f"{shown!r} cannot be read as {tag}; fix the value or remove the !!{tag} tag")
                return None
        if isinstance(value, float) and not math.isfinite(value):
            self._error(node, path, f"{value} is not a finite number; write a finite value")
            return None
        return value

    def _mapping(self, node: MappingNode, path: PathT, depth: int) -> dict:
        result: dict = {}
        merged: list[dict] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merged.extend(self._merge_sources(value_node, path, depth))
                continue
            if not isinstance(key_node, ScalarNode):
                self._error(key_node, path, "a mapping key must be a plain string, not a list or mapping; write key: value")
                continue
            key = self._scalar(key_node, path)
            if not isinstance(key, str):
                shown = "null" if key is None else str(key).lower() if isinstance(key, bool) else str(key)
                kind = _TYPE_NAMES.get(type(key).__name__, type(key).__name__)
                self._error(key_node, path, f"key {shown!r} is read as {kind}, not a string; quote it or use a name")
                continue
            child = path + (key,)
            if key in result:
                first = self.locations.keys.get(child, (0, 0))[0]
                self._error(key_node, child, f"duplicate key {key!r} (first set on line {first}); keep one of them")
                continue
            self.locations.keys[child] = _position(key_node)
            result[key] = self.build(value_node, child, depth + 1)
        for source in merged:  # YAML merge keys: explicit keys win
            for key, value in source.items():
                result.setdefault(key, value)
        return result

    def _merge_sources(self, node: Node, path: PathT, depth: int) -> list[dict]:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        found = []
        for source in sources:
            value = self.build(source, path, depth + 1)
            if isinstance(value, dict):
                found.append(value)
            elif value is not None:
                self._error(source, path, "a merge key (<<) takes a mapping or a list of mappings")
        return found
