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
    starts, start = [], 0
    for n in counts_E:
        starts.append(start)
        start += n
    order = iter(sorted((e for e, n in enumerate(counts_E) if n), key=lambda e: -counts_E[e]))
    take = threading.Lock()
    inference = torch.is_inference_mode_enabled()  # the caller's: its tensors may be inference tensors

    def drain() -> None:
        with torch.inference_mode(inference), torch.no_grad():  # this order: inference_mode(False) turns grad mode on
            while True:
                with take:
                    e = next(order, None)
                if e is None:
                    return
                work(e, slice(starts[e], starts[e] + counts_E[e]))

    threads = torch.get_num_threads()
    pool = _workers(threads - 1)
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(drain) for _ in range(threads - 1)]
        drain()
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(threads)
