"""Data for the tiny training runs: a shipped byte-level text corpus (see README.md here)."""

from moespec.data.corpus import BYTE_VOCAB, CorpusSplit, get_batch, load_corpus_bytes, load_split

__all__ = ["BYTE_VOCAB", "CorpusSplit", "get_batch", "load_corpus_bytes", "load_split"]
