"""Spec errors: one line each, `file:line:col: yaml.path: what is wrong; how to fix it`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

PathT = tuple  # a YAML path: keys (str) and list indices (int), from the document root
_PLAIN_KEY = re.compile(r"[\w$-]+")


def format_path(path: PathT) -> str:
    """('moe', 'overrides', 0, 'router', 'k') -> 'moe.overrides[0].router.k'.

    A key that is not a plain word (a typo'd `"n layers"`, a key with a newline or a dot) is
    written quoted, `model['n layers']`, so the path stays one unambiguous line.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(str(part)):
            text += f"[{str(part)!r}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(root)"


@dataclass(frozen=True)
class SpecError:
    file: str
    line: int  # 1-based
    col: int  # 1-based
    path: str  # formatted YAML path
    message: str  # what is wrong; how to fix it

    def format(self) -> str:
        # Newlines in a message would break the one-line contract (and grep-ability).
        message = " ".join(self.message.split())
        return f"{self.file}:{self.line}:{self.col}: {self.path}: {message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "col": self.col, "path": self.path, "message": self.message}


class SpecErrors(Exception):
    """Raised when a spec cannot be turned into a plan; carries every error found."""

    def __init__(self, errors: Iterable[SpecError]):
        self.errors = sorted(errors, key=lambda e: (e.file, e.line, e.col, e.path, e.message))
        super().__init__("\n".join(e.format() for e in self.errors))
