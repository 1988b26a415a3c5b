"""Keep freed memory in the process instead of handing it back to the OS (glibc malloc).

Why: glibc serves large blocks with fresh mmap'd pages and returns freed ones, so every
training step first-touches its activation and gradient buffers again. On the 2-core CPU VM
this project is developed on that page-faulting was ~20% of a 20M-parameter step (h05 of the
accuracy suite: 720-808 ms as is, 595-638 ms with freed memory kept), a cost no operator
micro-benchmark sees. A training process reuses the same sizes every step, so keeping them is
what a GPU caching allocator does too. Blocks of 32 MiB and more (glibc's cap on the mmap
threshold) would still be mmap'd and faulted in afresh each time: a dropless layer's [T*k, D]
rows are that big at k 8 (T 8192, D 256: 64 MiB), and gathering them into a fresh tensor took
35-39 ms where the same gather into a reused one took 5-8. So mmap is switched off for
malloc altogether (M_MMAP_MAX 0): large blocks come from the heap and stay there too (threads'
arenas still mmap what their 64 MiB heaps cannot hold). A loop that frees and asks again for
the same large size may still take fresh pages once more, at its second or third step: torch's
64-byte aligned request is a little larger than a freed block's hole when that block did not
merge with the heap's top. After that it faults nothing (tests/test_malloc_tuning.py). No-op off
glibc (macOS, musl) or when the user set MALLOC_* variables."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's cap on 64-bit: larger blocks are mmap'd unless M_MMAP_MAX is 0
KEEP_BYTES = (1 << 31) - 1  # trim threshold and top pad: keep up to 2 GiB of freed heap


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for a training loop; True if it took effect."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = [
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
        mallopt(M_MMAP_MAX, 0),  # not even above the threshold (module docstring)
        mallopt(M_TRIM_THRESHOLD, KEEP_BYTES),
        mallopt(M_TOP_PAD, 64 << 20),
    ]
    return all(done)
