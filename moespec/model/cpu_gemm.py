"""fp32 products of the dropless kernel's groups on oneDNN where this CPU runs them faster
than MKL: the thread engine's per-group matmuls (grouped_experts.Slab). Shape legend: M rows
of a group, K and N the two widths of a product.

Why. torch's CPU `mm` is MKL (2024.2 in torch 2.13), which on AMD CPUs takes its AVX2 path
even where AVX-512 is there: on the 2-core AMD EPYC (Zen 5) VM this was written on, one
thread ran mm at 107-118 GF/s. oneDNN (v3.12, inside torch: `torch.ops.mkldnn.
_linear_pointwise`, an inner product on its AVX-512 brgemm kernels) ran the same products
at 250-271 GF/s at 512+ rows and 174-189 at 64 rows, the weight-gradient form at 154-231,
with mm's fp32 accuracy. Where MKL takes its AVX-512 path (Intel) the gap may not be there,
so "auto" times both once on one thread (`_probe`) and takes oneDNN only where it is at
least PROBE_GAIN faster. MOESPEC_CPU_GEMM=mkl|onednn|auto overrides.

Bounded shapes. oneDNN builds a primitive per distinct shape (0.2-6 ms to create, 0.4-3 MB
of memory each, in a cache of 1024), and a dropless group's rows change every step: calls
at each exact row count would rebuild primitives every step and hold GBs. So a product is
cut into chunks of CHUNKS[0] rows (1024), the rest into at most one chunk of each smaller
size (512, 256), and a tail under the smallest, copied into a zero-padded buffer of a
multiple of ALIGN rows first: at most 3 + 256 / 16 = 18 row counts per product form (six
forms per expert shape: ~100 primitives, tens of MB). Why chunks as large as 1024: calls of
256 rows ran narrow products (K or N 128-256) at 109-115 GF/s on one thread where calls of
1024 ran them at 145 (Zen 5 VM, 4096 x 256 x 128). The dropless layer's step at g-e16k8
(D 256, F 128, 4096 rows a group) took 0.84x the time it took with 256-row calls (1.16x a
dense FFN before, 0.98x after; A/B in one process, paired by step), 0.92-0.96x at u-e24k8,
fine-32, g-e16k2, issue-3 and coarse, and 0.95-1.02x at eight shapes not looked at before.
Calls of 2048 rows gained nothing more (0.98-0.99x).

Small products stay on mm: a oneDNN call from Python costs ~10 us beside mm's ~1 us, plus
the copy of its result into the slice the kernel hands it, so a product under MIN_FLOPS
runs mm (`bench/moe_layer.py` issue-2: 64 rows of 256 x 256 per group were slower on
oneDNN). Only the thread engine's fp32 CPU products come here: never under a dispatch mode
(FlopCounterMode counts aten.mm; the thread engine is off there), and bf16 mm already runs
on oneDNN in torch.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from torch.utils._python_dispatch import _disable_current_modes

ENV = "MOESPEC_CPU_GEMM"
CHOICES = ("auto", "mkl", "onednn")
CHUNKS = (1024, 512, 256)  # rows of oneDNN calls, each at most half the one before (module docstring)
ALIGN = 16  # a tail's rows are padded to a multiple of this
MIN_FLOPS = 12_000_000  # 2 * M * K * N below which a product runs mm
PROBE_GAIN = 1.3

_STATE: dict[str, str | None] = {"backend": None}  # resolved: "mkl" | "onednn"


def requested() -> str:
    """The user's MOESPEC_CPU_GEMM (default "auto"); ValueError with one line if unknown."""
    return _known(os.environ.get(ENV, "auto").strip().lower() or "auto")


def _known(choice: str) -> str:
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not a CPU GEMM choice: use auto, mkl or onednn")
    return choice


def backend() -> str:
    """"onednn" or "mkl" for the thread engine's fp32 products, decided once per process."""
    if _STATE["backend"] is None:
        _STATE["backend"] = _resolve(requested())
    return _STATE["backend"]


def force(choice: str | None) -> None:
    """Decide again: "mkl", "onednn", "auto", or None (MOESPEC_CPU_GEMM). Tests and benches."""
    _STATE["backend"] = None if choice is None else _resolve(choice)


@contextlib.contextmanager
def using(choice: str):
    """Products decided inside the block on `choice` (resolved as `force`), the process's own
    choice kept for after it without deciding again (a bench's A/B, step by step)."""
    before = backend()
    _STATE["backend"] = _resolve(choice)
    try:
        yield
    finally:
        _STATE["backend"] = before


def use_onednn(a: torch.Tensor) -> bool:
    """Whether products of tensors like `a` go through this module (fp32, CPU, chosen)."""
    return a.dtype == torch.float32 and a.device.type == "cpu" and backend() == "onednn"


def _resolve(choice: str) -> str:
    if _known(choice) == "mkl":
        return "mkl"
    if not _runs():
        if choice == "onednn":
            raise ValueError(f"{ENV}=onednn: this torch has no usable oneDNN (torch.backends.mkldnn)")
        return "mkl"
    return "onednn" if choice == "onednn" or _probe() >= PROBE_GAIN else "mkl"


def _runs() -> bool:
    """oneDNN's fp32 inner product exists here and agrees with mm."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        with _disable_current_modes(), torch.no_grad():
            a_MK, w_KN = torch.randn(20, 24, dtype=torch.float32), torch.randn(24, 40, dtype=torch.float32)
            out_MN = torch.empty(20, 40)
            return torch.allclose(times_into(a_MK, w_KN, out_MN, min_flops=0), a_MK @ w_KN, rtol=1e-4, atol=1e-4)
    except (RuntimeError, NotImplementedError):
        return False


def _probe(size: int = 256, repeats: int = 5) -> float:
    """mm's time over oneDNN's for one [size]^3 product on one thread (best of `repeats`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _disable_current_modes(), torch.no_grad():
            a_MK, w_KN = torch.randn(size, size), torch.randn(size, size)
            out_MN = torch.empty(size, size)
            timings = {}
            for name, run in (("mm", lambda: torch.mm(a_MK, w_KN, out=out_MN)), ("onednn", lambda: times_into(a_MK, w_KN, out_MN, min_flops=0))):
                seconds = []
                for _ in range(repeats + 2):
                    start = time.perf_counter()
                    run()
                    seconds.append(time.perf_counter() - start)
                timings[name] = min(seconds[2:])
            return timings["mm"] / timings["onednn"]
    finally:
        torch.set_num_threads(threads)


def _linear(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w^T, [M, N], on oneDNN's inner product (w may be a strided view)."""
    return torch.ops.mkldnn._linear_pointwise(x_MK, w_NK, None, "none", [], "")


def _chunks(rows: int):
    """(start, stop, padded rows) of each oneDNN call over `rows` rows: chunks of CHUNKS[0]
    rows, then at most one of each smaller size, then the tail padded to a multiple of ALIGN."""
    sizes, rest = [CHUNKS[0]] * (rows // CHUNKS[0]), rows % CHUNKS[0]
    for size in CHUNKS[1:]:
        if rest >= size:
            sizes.append(size)
            rest -= size
    start = 0
    for size in sizes:
        yield start, start + size, size
        start += size
    if rest:
        yield start, rows, -(-rest // ALIGN) * ALIGN


def _padded(a_MK: torch.Tensor, rows: int) -> torch.Tensor:
    """a with zero rows appended up to `rows` (a itself when it has them)."""
    if a_MK.shape[0] == rows:
        return a_MK
    out = a_MK.new_zeros(rows, a_MK.shape[1])
    out[: a_MK.shape[0]] = a_MK
    return out


def times_into(a_MK: torch.Tensor, w_KN: torch.Tensor, out_MN: torch.Tensor, add: bool = False, min_flops: int | None = None) -> torch.Tensor:
    """out = a @ w (add: out += a @ w), in bounded padded chunks (module docstring)."""
    rows, k, n = a_MK.shape[0], a_MK.shape[1], w_KN.shape[1]
    if 2 * rows * k * n < (MIN_FLOPS if min_flops is None else min_flops):
        return torch.addmm(out_MN, a_MK, w_KN, out=out_MN) if add else torch.mm(a_MK, w_KN, out=out_MN)
    w_NK = w_KN.t()
    for start, stop, padded in _chunks(rows):
        part_MN = _linear(_padded(a_MK[start:stop], padded), w_NK)[: stop - start]
        (out_MN[start:stop].add_ if add else out_MN[start:stop].copy_)(part_MN)
    return out_MN


def weight_grad_into(a_MK: torch.Tensor, g_MN: torch.Tensor, out_KN: torch.Tensor, min_flops: int | None = None) -> torch.Tensor:
    """out = a^T @ g, summed over chunks of the rows (zero rows add nothing)."""
    rows, k, n = a_MK.shape[0], a_MK.shape[1], g_MN.shape[1]
    if rows == 0 or 2 * rows * k * n < (MIN_FLOPS if min_flops is None else min_flops):
        return torch.mm(a_MK.t(), g_MN, out=out_KN)
    for start, stop, padded in _chunks(rows):
        part_KN = _linear(_padded(a_MK[start:stop], padded).t(), _padded(g_MN[start:stop], padded).t())
        (out_KN.copy_ if start == 0 else out_KN.add_)(part_KN)
    return out_KN
