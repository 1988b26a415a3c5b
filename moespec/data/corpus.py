"""Byte-level tokens from the shipped corpus, a deterministic train/val split, and batches.

Bytes, not a learned tokenizer: the vocabulary is fixed (256), nothing has to be trained or
downloaded, and any spec with vocab_size >= 256 can train on it. The split is by position
(the last `val_fraction` of the file is validation) so that it never depends on a seed.
Source and licence of the text: README.md and LICENSE-PSF.txt beside this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch

BYTE_VOCAB = 256
CORPUS_FILE = "python_docs_topics.txt"


def load_corpus_bytes() -> bytes:
    """The raw corpus, read from the installed package (works from a wheel too)."""
    return resources.files("moespec.data").joinpath(CORPUS_FILE).read_bytes()


@dataclass(frozen=True)
class CorpusSplit:
    train: torch.Tensor  # [N_train] long, byte values 0..255 (or a user's ids: a numpy memory map)
    val: torch.Tensor  # [N_val] long


def load_split(*, val_fraction: float = 0.1) -> CorpusSplit:
    """Train on the first (1 - val_fraction) of the bytes, validate on the rest."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = torch.frombuffer(bytearray(load_corpus_bytes()), dtype=torch.uint8).long()  # [N]
    cut = int(len(data) * (1.0 - val_fraction))
    return CorpusSplit(train=data[:cut], val=data[cut:])


def get_batch(ids: torch.Tensor, *, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of seq_len + 1 tokens, [B, S+1]: inputs are [:, :-1], targets
    [:, 1:]. The generator makes the sequence of batches reproducible from a seed."""
    if len(ids) < seq_len + 2:
        raise ValueError(f"corpus part of {len(ids)} tokens is too short for seq_len {seq_len}")
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)  # [B]
    return windows_from(ids, starts, seq_len + 1)  # [B, S+1]


def windows_from(ids, starts_B: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length] long ids from a tensor or a (memory-mapped) numpy array of a user's token
    file (data/tokens.py), reading only those rows."""
    index_BL = starts_B[:, None] + torch.arange(length)[None, :]  # [B, L]
    if isinstance(ids, torch.Tensor):
        return ids[index_BL].long()
    import numpy as np

    return torch.from_numpy(np.asarray(ids[index_BL.numpy()]).astype(np.int64))
