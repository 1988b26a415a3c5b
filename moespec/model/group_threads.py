"""The dropless kernel's per-group matmuls on a multi-core CPU: groups spread over the
intra-op threads, each matmul on one thread, handed out largest first as threads come free.

Why. On CPU `torch._grouped_mm` is one mm per group, and each mm splits over every intra-op
thread: a group of 64-512 rows is too small to keep both cores of a 2-core machine busy, and
every mm ends in a barrier where the threads wait for each other. On a busy machine (another
process holding a core) each barrier waits for the descheduled thread, so a layer of E groups
pays E stalls per matmul: the dropless path slowed 2.5-4.4x beside one busy core where the
capacity path's bmm slowed 2x (issue 13). Here no group is split, so no barrier is crossed
inside the layer's matmuls; a thread whose core is taken simply finishes fewer groups, and the
other takes the rest. Measured on a 2-core VM, one forward product alone on uneven groups
(E 8-128, 64-4096 rows, D 256-512): quiet 0.73-1.05x `_grouped_mm`'s time, beside a busy core
0.34-0.75x. Layer-level, side by side: `bench/moe_layer.py --engines [--busy]`.

The matmuls are exactly the per-group `mm`s of the loop (same rows, same FLOPs), written into
slices of one preallocated output. It is used only where it can be seen whole: a CPU tensor,
at least two intra-op threads, and no TorchDispatchMode active (FlopCounterMode, MemTracker
and op traces are thread-local, and would not see the worker threads' ops): otherwise the
kernel takes `_grouped_mm` or the loop, with the same numbers.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_POOL: dict[str, ThreadPoolExecutor | int | None] = {"pool": None, "workers": 0}
_LOCK = threading.Lock()


def usable(device: torch.device) -> bool:
    """Whether the groups may run on threads here (module docstring)."""
    return device.type == "cpu" and torch.get_num_threads() > 1 and _get_current_dispatch_mode() is None


def _one_thread() -> None:
    torch.set_num_threads(1)


def _workers(n: int) -> ThreadPoolExecutor:
    """A pool of n threads, each set to one intra-op thread; rebuilt when n changes."""
    with _LOCK:
        if _POOL["workers"] != n:
            if _POOL["pool"] is not None:
                _POOL["pool"].shutdown(wait=True)
            _POOL["pool"], _POOL["workers"] = ThreadPoolExecutor(max_workers=n, initializer=_one_thread, thread_name_prefix="moespec-groups"), n
        return _POOL["pool"]


def run(counts_E: list[int], work) -> None:
    """work(e, rows) for every non-empty group e (rows: its slice of the sorted rows), on this
    thread and torch.get_num_threads() - 1 workers, largest group first. work must only write
    its own group's output; it runs without autograd recording (the kernel's matmuls are its
    own backward's business)."""
    run_pieces(pieces(counts_E, torch.get_num_threads(), max_extra=0), lambda piece: work(piece.expert, piece.rows))  # whole groups


@dataclass(frozen=True)
class Piece:
    """A run of one group's rows handed to one thread. `extra` is -1 for a group's first (or
    only) piece, which writes its expert's own slices of the weight gradients; a further piece
    of a split group writes partial gradients into slot `extra` of a scratch buffer, added to
    its expert's after the run, in slot order (so the result does not depend on which thread
    ran what)."""

    expert: int
    rows: slice
    extra: int
    groups: int = 1  # a bundle of small whole groups: experts expert .. expert + groups - 1


MIN_PIECE_ROWS = {"rows": 256}  # below this an mm's rows cost more than balance gains (tests lower it)
BUNDLE = {"rows": 512, "bytes": 3 << 19}  # a bundle's most rows, and most bytes of its rows' activations (1.5 MiB)


def bundle_rows(row_bytes: int) -> int:
    """The most rows a bundle of small groups may hold when each row's activations (gathered
    input, hidden pre-activations) take `row_bytes`: bundles help while those stay in cache
    (A/B on a 2-core Zen 3 VM: 64-128-row groups at D 256 took 0.83-0.95x the time in bundles
    of 512 rows; 256-row groups at D 512-1024 joined in pairs took 1.03-1.08x)."""
    return min(BUNDLE["rows"], BUNDLE["bytes"] // max(row_bytes, 1))


def pieces(counts_E: list[int], threads: int, max_extra: int = 0, bundle_rows: int = 0) -> list[Piece]:
    """The groups as pieces for `threads` threads: one piece per group, unless handing whole
    groups out largest first would leave a thread idle for more than 5% of the run (7 groups on
    2 threads: one thread runs 4, the other 3, idle an eighth of the time); then groups are cut
    into pieces of about a quarter thread's share (at least `MIN_PIECE_ROWS`), the largest
    pieces first, with at most `max_extra` pieces beyond one per group (each needs a scratch
    slot for its partial weight gradients). `bundle_rows`: consecutive whole groups joined into
    bundles of at most that many rows (`_bundled`), for work that takes a run of groups. Depends
    only on the counts, the thread count and the bundle size:
    the same counts give the same pieces, and so the same sums."""
    min_rows = MIN_PIECE_ROWS["rows"]
    groups = [(e, n) for e, n in enumerate(counts_E) if n]
    total = sum(n for _, n in groups)
    cuts = {e: 1 for e, _ in groups}
    if threads > 1 and max_extra > 0 and _largest_first_makespan([n for _, n in groups], threads) > 1.05 * total / threads:
        target = max(min_rows, -(-total // (4 * threads)))
        for _ in range(max_extra):  # one more cut to the group with the largest pieces, while they are too large
            e, n = max(groups, key=lambda g: (g[1] / cuts[g[0]], -g[0]))
            if n / cuts[e] <= target or n // (cuts[e] + 1) < min_rows:
                break
            cuts[e] += 1
    out, start, extra = [], 0, 0
    for e, n in enumerate(counts_E):
        for i in range(cuts.get(e, 0)):
            lo, hi = start + n * i // cuts[e], start + n * (i + 1) // cuts[e]
            out.append(Piece(e, slice(lo, hi), -1 if i == 0 else extra))
            extra += i > 0
        start += n
    whole = {e for e, c in cuts.items() if c == 1}
    return _bundled(out, whole, min(bundle_rows, total // (8 * threads))) if bundle_rows and threads > 1 else out


def _bundled(pieces_: list[Piece], whole: set[int], rows: int) -> list[Piece]:
    """Consecutive whole groups joined into bundles of at most `rows` rows. Why: a group's
    pipeline is ~40 ops (gather, products, activation, gate, their backward), and at 64-128
    rows a group their dispatch, not their arithmetic, was most of the non-product time
    (issue-2: E 128, 64 rows a group, ~60 of ~215 ms a thread; ~18 in bundles). A bundle runs
    its elementwise ops once over all its rows and only its products per group. The caller
    caps `rows` at an eighth of a thread's share, so balance suffers little."""
    out: list[Piece] = []
    for p in pieces_:
        last = out[-1] if out else None
        if last is not None and p.expert in whole and last.expert in whole and p.rows.stop - last.rows.start <= rows:
            out[-1] = Piece(last.expert, slice(last.rows.start, p.rows.stop), -1, p.expert - last.expert + 1)
        else:
            out.append(p)
    return out


def _largest_first_makespan(sizes: list[int], threads: int) -> int:
    """The busiest thread's rows when whole groups go, largest first, to the least loaded."""
    loads = [0] * threads
    for n in sorted(sizes, reverse=True):
        loads[loads.index(min(loads))] += n
    return max(loads)


def run_pieces(pieces_: list[Piece], work) -> None:
    """work(piece) for every piece, on this thread and torch.get_num_threads() - 1 workers,
    largest first as threads come free. work must only write its own piece's outputs; it runs
    without autograd recording (the kernel's matmuls are its own backward's business)."""
    order = iter(sorted(pieces_, key=lambda p: p.rows.start - p.rows.stop))
    take = threading.Lock()
    inference = torch.is_inference_mode_enabled()  # the caller's: its tensors may be inference tensors

    def drain() -> None:
        with torch.inference_mode(inference), torch.no_grad():  # this order: inference_mode(False) turns grad mode on
            while True:
                with take:
                    piece = next(order, None)
                if piece is None:
                    return
                work(piece)

    threads = torch.get_num_threads()
    pool = _workers(threads - 1) if threads > 1 else None  # one thread: no pool (the kernel never asks; a bench may)
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(drain) for _ in range(threads - 1)]
        drain()
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(threads)
