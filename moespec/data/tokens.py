"""The user's tokens: a flat token file (nanoGPT's `.bin` of uint16/uint32 ids, or a `.npy`),
memory-mapped so that a file larger than memory trains, or a UTF-8 text file tokenised on load
(bytes, or a Hugging Face tokenizer by name when `transformers` is installed).

`moespec data prepare` turns text into a token file with a JSON sidecar (`PATH.json`) naming
the dtype and the tokenizer, so a `.bin` is read as it was written. Every way a file can be
unusable (a dtype that is not an integer id, a size that is not whole ids, ids at or above the
model's vocabulary, too few tokens for one sequence in either split) is a `TokenFileError`
with one line naming the file and the fix. The split is by position, as for the shipped
corpus: the last `val_fraction` of the tokens is validation.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moespec.data.corpus import BYTE_VOCAB, CorpusSplit
from moespec.files import write_atomic

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32, "int64": np.int64}
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".csv", ".json", ".py", ".rst", ".html")
_SCAN_CHUNK = 1 << 24  # ids checked against the vocabulary 16M at a time: bounded memory on any file


class TokenFileError(ValueError):
    """A token or text file that cannot be trained on, as one line."""


@dataclass(frozen=True)
class TokenFile:
    """What a token file holds: ids (a read-only memory map or an in-memory array) and where they
    came from. `tokenizer` is "bytes", a Hugging Face name, or None when not recorded."""

    path: Path
    ids: np.ndarray  # [N] integer ids
    tokenizer: str | None


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_token_file(path: str | Path, *, dtype: str | None = None, tokenizer: str | None = None) -> TokenFile:
    """A token file (`.bin` or `.npy`) memory-mapped, or a text file tokenised. `dtype` is for a
    `.bin` without a sidecar (default uint16, nanoGPT's); `tokenizer` for text (default bytes)."""
    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"{path}: no such file")
    if path.suffix == ".npy":
        return TokenFile(path, _read_npy(path), _sidecar(path).get("tokenizer"))
    if path.suffix == ".bin":
        meta = _sidecar(path)
        name = dtype or meta.get("dtype") or "uint16"
        if name not in TOKEN_DTYPES:
            raise TokenFileError(f"{path}: dtype {name!r} is not one of {', '.join(TOKEN_DTYPES)}")
        itemsize = np.dtype(TOKEN_DTYPES[name]).itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise TokenFileError(f"{path}: {size:,} bytes is not a whole number of {name} ids; give the dtype it was written with (--data-dtype)")
        if size == 0:
            raise TokenFileError(f"{path}: the file is empty")
        return TokenFile(path, np.memmap(path, dtype=TOKEN_DTYPES[name], mode="r"), meta.get("tokenizer"))
    return TokenFile(path, tokenize_text(path, tokenizer or "bytes"), tokenizer or "bytes")


def _read_npy(path: Path) -> np.ndarray:
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise TokenFileError(f"{path}: not a readable .npy array ({' '.join(str(exc).split())})") from None
    if ids.dtype.kind not in "iu":
        raise TokenFileError(f"{path}: holds {ids.dtype} values; a token file holds integer ids (uint16, uint32, int32 or int64)")
    if ids.ndim != 1:
        raise TokenFileError(f"{path}: holds an array of shape {tuple(ids.shape)}; a token file is one flat [N] sequence of ids")
    return ids


def _sidecar(path: Path) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"{side}: not a JSON sidecar ({' '.join(str(exc).split())}); delete it or write it again with `moespec data prepare`") from None
    return meta if isinstance(meta, dict) else {}


def tokenize_text(path: Path, tokenizer: str = "bytes") -> np.ndarray:
    """A UTF-8 text file as ids: its bytes (vocabulary 256) or a Hugging Face tokenizer's ids."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenFileError(f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start:,}); a token file must end in .bin or .npy") from None
    if tokenizer == "bytes":
        return np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenFileError(f"tokenizer {tokenizer!r} needs transformers (pip install transformers); --tokenizer bytes needs nothing") from None
    try:
        hf = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as exc:
        raise TokenFileError(f"tokenizer {tokenizer!r} could not be loaded ({' '.join(str(exc).split())[:200]})") from None
    return np.asarray(hf(text)["input_ids"], dtype=np.int64)


def tokenizer_vocab(tokenizer: str) -> int:
    if tokenizer == "bytes":
        return BYTE_VOCAB
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer))


def check_ids(tokens: TokenFile, *, vocab_size: int) -> None:
    """Every id in [0, vocab_size), scanned in chunks so a file larger than memory is checked too."""
    ids = tokens.ids
    for start in range(0, len(ids), _SCAN_CHUNK):
        chunk = np.asarray(ids[start : start + _SCAN_CHUNK])
        high, low = int(chunk.max()), int(chunk.min())
        if high >= vocab_size or low < 0:
            bad = high if high >= vocab_size else low
            where = start + int(np.argmax(chunk == bad))
            raise TokenFileError(
                f"{tokens.path}: token id {bad:,} at position {where:,} is outside the model's vocabulary of {vocab_size:,}; "
                "raise model.vocab_size or give the file's real dtype (--data-dtype)"
            )


def load_token_split(path: str | Path, *, vocab_size: int, window: int, val_fraction: float = 0.1,
                     dtype: str | None = None, tokenizer: str | None = None) -> CorpusSplit:  # fmt: skip
    """The file's ids split by position into train and validation, each long enough for one
    `window` (seq_len + 1 tokens, or a span-corruption window) and all below vocab_size."""
    if not 0.0 < val_fraction < 1.0:
        raise TokenFileError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    tokens = read_token_file(path, dtype=dtype, tokenizer=tokenizer)
    n = len(tokens.ids)
    cut = int(n * (1.0 - val_fraction))
    if min(cut, n - cut) < window + 1:
        raise TokenFileError(
            f"{tokens.path}: {n:,} tokens give a train part of {cut:,} and a validation part of {n - cut:,}; each needs at "
            f"least {window + 1:,} (one sequence); give a longer file or change --val-fraction"
        )
    check_ids(tokens, vocab_size=vocab_size)
    return CorpusSplit(train=tokens.ids[:cut], val=tokens.ids[cut:])


def prepare(source: str | Path, out: str | Path, *, tokenizer: str = "bytes", dtype: str | None = None) -> dict:
    """Tokenise a text file into `out` (.bin, or .npy) and its sidecar, both written to a
    temporary name and renamed, so a failed run leaves nothing. Returns the sidecar's content."""
    source, out = Path(source), Path(out)
    if out.suffix not in (".bin", ".npy"):
        raise TokenFileError(f"{out}: the output must end in .bin or .npy")
    ids = tokenize_text(source, tokenizer) if source.is_file() else None
    if ids is None:
        raise TokenFileError(f"{source}: no such file")
    if len(ids) == 0:
        raise TokenFileError(f"{source}: no text to tokenise")
    top = int(ids.max())
    name = dtype or ("uint16" if top < 2**16 else "uint32")
    if name not in TOKEN_DTYPES:
        raise TokenFileError(f"--dtype {name!r} is not one of {', '.join(TOKEN_DTYPES)}")
    if top > np.iinfo(TOKEN_DTYPES[name]).max:
        raise TokenFileError(f"id {top:,} does not fit {name}; use --dtype uint32")
    ids = ids.astype(TOKEN_DTYPES[name])
    meta = {"dtype": name, "tokenizer": tokenizer, "tokens": int(len(ids)), "max_id": top, "source": str(source)}
    if out.suffix == ".bin":
        payload = ids.tobytes()
    else:
        buffer = io.BytesIO()
        np.save(buffer, ids, allow_pickle=False)
        payload = buffer.getvalue()
    write_atomic(out, payload)
    write_atomic(sidecar_path(out), json.dumps(meta, indent=2) + "\n")
    return meta
