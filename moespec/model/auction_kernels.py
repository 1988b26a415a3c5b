"""The auction's compiled round, releases (`_auction_c.c`) and augmenting paths
(`_auction_paths.h`), through ctypes.

Why ctypes and not an extension module: the kernels take numpy arrays and scalars and return
nothing, so a plain C library needs no Python headers to build, and `setup.py` can mark it
optional. Where it was not built (no C compiler at install) `available()` is False and the
auction runs the numpy round (`auction_host`), which gives the same assignments to the bit,
only slower; `moespec compile` says which one a BASE layer runs.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
from pathlib import Path

import numpy as np

_ABI = 5  # moespec_auction_abi() in _auction_c.c
_C_TYPES = {np.dtype(np.float32): (ctypes.c_float, "f32"), np.dtype(np.float64): (ctypes.c_double, "f64")}


def _library_path() -> Path | None:
    spec = importlib.util.find_spec("moespec.model._auction_c")
    if spec is not None and spec.origin and spec.origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return Path(spec.origin)
    return None


def _load() -> dict | None:
    path = _library_path()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
    except OSError:
        return None
    if library.moespec_auction_abi() != _ABI:  # a stale build from an older checkout
        return None
    kernels = {}
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for dtype, (scalar, suffix) in _C_TYPES.items():
        bid = getattr(library, f"moespec_bid_round_{suffix}")
        bid.argtypes = [pointer, size, pointer, pointer, size, pointer, pointer, size, scalar, pointer, pointer, pointer]
        bid.restype = ctypes.c_int
        release = getattr(library, f"moespec_release_unhappy_{suffix}")
        release.argtypes = [pointer, size, size, pointer, pointer, size, pointer, scalar, pointer, pointer, pointer, pointer]
        release.restype = None
        augment = getattr(library, f"moespec_augment_all_{suffix}")
        augment.argtypes = [pointer, size, size, pointer, pointer, size, pointer, scalar, pointer]
        augment.restype = ctypes.c_int
        kernels[dtype] = (bid, release, augment)
    return kernels


_KERNELS = _load()
# Tests and benches switch the compiled kernels off to compare them with the numpy round.
COMPILED = {"enabled": True}


def available() -> bool:
    """True if the compiled round was built and loads (and is not switched off)."""
    return _KERNELS is not None and COMPILED["enabled"]


def _address(array: np.ndarray, dtype) -> int:
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise TypeError(f"auction kernel: need a C-contiguous {np.dtype(dtype)} array, got {array.dtype}")
    return array.ctypes.data


def bind(scores_TE: np.ndarray, price_E: np.ndarray, holder_EM: np.ndarray, expert_T: np.ndarray):
    """(bid_round(bidder_U, eps), release(eps)) on one solve's arrays, updated in place: the
    compiled `auction_host.bid_round` and `auction._release_unhappy`. The arrays' addresses are
    taken once (a round with a few dozen bidders costs ~10 us, and each lookup ~1 us), and
    with them the solve's cache of each token's best other expert (`best_other` in
    _auction_c.c), which is valid only while prices never fall: one per solve."""
    bid, release, _ = _KERNELS[scores_TE.dtype]
    T, E = scores_TE.shape
    M = holder_EM.shape[1]
    cache = (np.full(T, -1, dtype=np.int64), np.full(T, -1, dtype=np.int64), np.zeros(T, dtype=scores_TE.dtype))
    scratch_T = np.empty(T, dtype=np.uint8)
    scores, price = _address(scores_TE, scores_TE.dtype), _address(price_E, scores_TE.dtype)
    holder, expert = _address(holder_EM, np.int64), _address(expert_T, np.int64)
    other, own, bound = (a.ctypes.data for a in cache)
    alive = (scores_TE, price_E, holder_EM, expert_T, cache, scratch_T)  # the closures hold what the addresses point into

    def bid_round(bidder_U: np.ndarray, eps: float, _alive=alive) -> None:
        if bidder_U.dtype != np.int64 or not bidder_U.flags.c_contiguous:
            raise TypeError("auction kernel: bidders must be a contiguous int64 array")
        if bid(scores, E, price, holder, M, expert, bidder_U.ctypes.data, bidder_U.size, eps, other, own, bound) != 0:
            raise MemoryError("auction kernel: out of memory in a bidding round")

    def release_unhappy(eps: float, _alive=alive) -> None:
        release(scores, T, E, price, holder, M, expert, eps, scratch_T.ctypes.data, other, own, bound)

    return bid_round, release_unhappy


def augment_all(
    scores_TE: np.ndarray, price_E: np.ndarray, holder_EM: np.ndarray, expert_T: np.ndarray, eps: float,
) -> tuple[int, int]:
    """`auction_host.augment_all`, compiled: place every unassigned token by shortest augmenting
    paths; returns (tokens placed, searches)."""
    augment = _KERNELS[scores_TE.dtype][2]
    T, E = scores_TE.shape
    M = holder_EM.shape[1]
    counts = np.zeros(2, dtype=np.int64)
    status = augment(
        _address(scores_TE, scores_TE.dtype), T, E, _address(price_E, scores_TE.dtype),
        _address(holder_EM, np.int64), M, _address(expert_T, np.int64), eps, counts.ctypes.data,
    )
    if status == -1:
        raise MemoryError("auction kernel: out of memory in the augmenting paths")
    if status != 0:
        raise RuntimeError("auction: no free slot reachable, or a cycle in the shortest-path tree")
    return int(counts[0]), int(counts[1])
