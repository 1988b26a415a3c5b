"""Activation recomputation (`parallelism.recompute`), applied from outside the model.

`checkpoint(fn, *args)` runs torch's non-reentrant `torch.utils.checkpoint` with a context
that tells code inside whether it runs for the first time or is being replayed in backward.
Replays must repeat the first run exactly: torch restores its RNG for dropout and router noise,
and `is_recomputing()` lets stateful choices (BASE's token-shuffle permutation, drawn from a
per-call counter) reuse what the first run drew instead of drawing anew.
"""

from __future__ import annotations

import contextlib
import threading

import torch.utils.checkpoint

_STATE = threading.local()


def is_recomputing() -> bool:
    """True while torch.utils.checkpoint replays a forward during backward."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def _recomputing():
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _contexts():
    return contextlib.nullcontext(), _recomputing()


def checkpoint(fn, *args, **kwargs):
    """fn(*args, **kwargs), its activations dropped after forward and recomputed in backward."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts, **kwargs)
