"""The dropless kernel's per-group matmuls (model/grouped_experts.py GroupedExpertsFn): which engine
runs them and the engines themselves. Shape legend: A rows sorted by expert, E groups,
K and N the two widths of a product.

The dropless matmuls are grouped GEMMs (`torch._grouped_mm`, one call per projection for all
experts) where the device and dtype run them (`grouped_gemm_available`: CPU float32/bf16 in
torch 2.13, CUDA where its kernel exists), and one mm per group otherwise (float64 for
gradcheck, the meta device, whose kernel demands bf16). Both give the same numbers. On CPU the
grouped call is 0.87-1.04x the loop's time (timed alone against it at E 8-128, D 256-1024,
2 threads, on the 2-core VM this was written on), and it
is one op where the loop is E. FlopCounterMode counts `_grouped_mm` as zero FLOPs unless told:
its formula is registered below (2 * rows * K * N for any group sizes), so counts stay exact.
When every group has the same rows (BASE layers: exactly T/E each) the matmuls are one bmm on
the [E, N, .] view instead, the same FLOPs with both cores busy (`uniform_rows`), except where
the thread engine's oneDNN products beat MKL's bmm (`equal_groups_threaded_flops`). On a CPU
with several intra-op threads the engine is "threads": the kernel then runs each group's whole
pipeline on one thread (grouped_experts.py, `group_threads`: no barrier per group, so a busy
core slows the layer no more than the capacity path's bmm), with plain mm's (fp32 ones on
oneDNN where this CPU runs them faster than MKL: `cpu_gemm`). The "threads"
form of `rows_times_weights` and `weight_grad` below (one product's groups spread over the
threads) is what the product-level benches time it against (bench/group_products.py,
bench/moe_stages.py). `engine` chooses; all give the same numbers.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import register_flop_formula

from moespec.model import cpu_gemm, group_threads


def groups(counts_E: list[int]):
    """(expert, row slice) for each non-empty group of rows sorted by expert."""
    start = 0
    for e, n in enumerate(counts_E):
        if n:
            yield e, slice(start, start + n)
        start += n


@register_flop_formula(torch.ops.aten._grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a grouped GEMM from shapes alone: whatever the group sizes, each row (or each
    contracted row, for the [K, A] x [A, N] weight-gradient form) is multiplied once."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # [A, K] x [E, K, N]: rows in groups
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # [K, A] x [A, N] -> [E, K, N]: contraction in groups
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # [E, M, K] x [K, N]: columns in groups
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # batched


# Tests and benches switch the fast engines off to compare with the loop ("enabled"), or only
# the threads, to compare them with `_grouped_mm` ("threads": bench/moe_layer.py --engines).
GROUPED_GEMM = {"enabled": True, "threads": True}


@functools.cache
def _grouped_gemm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs here and agrees with mm: tried once on a tiny problem
    with an empty group, in each layout the kernel uses."""
    if device_type == "meta" or not hasattr(torch, "_grouped_mm"):
        return False
    with _disable_current_modes():  # not seen by an active FlopCounterMode or op trace
        return _try_grouped_gemm(device_type, dtype)


def _try_grouped_gemm(device_type: str, dtype: torch.dtype) -> bool:
    try:
        generator = torch.Generator().manual_seed(0)
        counts_E = [3, 0, 5]
        offs = torch.tensor([3, 3, 8], dtype=torch.int32, device=device_type)
        x_AK = torch.randn(8, 16, generator=generator, device="cpu").to(device_type, dtype)  # cpu: the generator's device,
        w_EKN = torch.randn(3, 16, 8, generator=generator, device="cpu").to(device_type, dtype)  # under any default device
        g_AN = torch.randn(8, 8, generator=generator, device="cpu").to(device_type, dtype)
        loop = rows_times_weights(x_AK, w_EKN, counts_E, None), weight_grad(x_AK, g_AN, counts_E, None, 3)
        grouped = torch._grouped_mm(x_AK, w_EKN, offs=offs), torch._grouped_mm(x_AK.t(), g_AN, offs=offs)
        back = torch._grouped_mm(g_AN, w_EKN.transpose(1, 2), offs=offs)
        return all(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2) for a, b in zip(loop, grouped)) and back.shape == (8, 16)
    except (RuntimeError, NotImplementedError):
        return False


def engine(counts_E: list[int], w_EKN: torch.Tensor) -> str:  # "batched" | "threads" | "grouped" | "loop"
    """"batched" when every group has the same rows (BASE), unless the thread engine's oneDNN
    products are the faster (`equal_groups_threaded_flops`); else on a multi-core CPU
    "threads" (each group's mm on one thread, `group_threads`); else "grouped" where
    `_grouped_mm` runs; else "loop". GROUPED_GEMM off forces the loop (tests compare with it)."""
    if not GROUPED_GEMM["enabled"]:
        return "loop"
    rows = uniform_rows(counts_E)
    if rows and 2 * rows * w_EKN.shape[1] * w_EKN.shape[2] < equal_groups_threaded_flops(w_EKN):
        return "batched"
    if GROUPED_GEMM["threads"] and group_threads.usable(w_EKN.device):
        return "threads"
    return "grouped" if grouped_gemm_available(w_EKN) else "loop"


def equal_groups_threaded_flops(w_EKN: torch.Tensor) -> float:
    """The FLOPs of one product (2 * rows * D * F) from which equal groups leave the bmm for
    the thread engine: `cpu_gemm.MIN_FLOPS` where that engine runs and its fp32 products are on
    oneDNN, else never (inf). Why: bmm is MKL's, which takes its AVX2 path on AMD CPUs; on a
    2-core AVX-512 EPYC (Zen 5) a BASE layer took 0.56-0.77x the time on the thread engine at
    8 shapes whose products are 34-1180 MFLOP, and 1.09-1.18x at two of 4-8 MFLOP, where its
    products are MKL's too (one process, interleaved, paired by step). The calibration
    records it (`OpDatabase.equal_groups_threaded_flops`) so the cost model times such groups
    by the kernel's own database, as it does uneven ones."""
    if GROUPED_GEMM["threads"] and group_threads.usable(w_EKN.device) and cpu_gemm.use_onednn(w_EKN):
        return float(cpu_gemm.MIN_FLOPS)
    return math.inf


def grouped_gemm_available(w_EKN: torch.Tensor) -> bool:
    """The grouped GEMM for an expert weight like w: on, it runs for w's device and dtype,
    and both widths are multiples of 16 bytes (the kernel's stride rule)."""
    widths_ok = all(n * w_EKN.element_size() % 16 == 0 for n in w_EKN.shape[1:])
    return GROUPED_GEMM["enabled"] and widths_ok and _grouped_gemm_runs(w_EKN.device.type, w_EKN.dtype)


def uniform_rows(counts_E: list[int]) -> int:
    """N when every group holds the same N > 0 rows, else 0. Then the sorted rows are an
    [E, N, .] batch and `bmm` runs them, with the same FLOPs: on CPU `_grouped_mm` is one mm per
    group, which at BASE's 16-128 rows per expert leaves one core of two idle (its layer was 1.5x
    a Switch layer at E 128, T 2048, d 512, F 128; 1.2x with bmm, bench/moe_layer.py --routers)."""
    first = counts_E[0] if counts_E else 0
    return first if first and all(n == first for n in counts_E) else 0


def offsets(counts_E: list[int], device: torch.device) -> torch.Tensor:
    """End row of each group (int32): torch._grouped_mm's `offs`."""
    return torch.tensor(list(itertools.accumulate(counts_E)), dtype=torch.int32, device=device)


def matmul_engine(engine: str, counts_E: list[int], device: torch.device) -> int | str | torch.Tensor | None:
    """How the group matmuls run, as `rows_times_weights` and `weight_grad` take it: N (the
    "batched" engine: every group holds N rows, one bmm on the [E, N, .] view), "threads"
    (`group_threads`), the group ends (`_grouped_mm`'s offs) or None (one mm per group).
    A backward run under a dispatch mode the forward did not see takes the loop: same mm's."""
    if engine == "batched":
        return counts_E[0]
    if engine == "threads":
        return "threads" if group_threads.usable(device) else None
    if engine == "grouped" and sum(counts_E):
        return offsets(counts_E, device)
    return None


def rows_times_weights(a_AK: torch.Tensor, w_EKN: torch.Tensor, counts_E: list[int], how, into: torch.Tensor | None = None) -> torch.Tensor:
    """out[rows of e] = a[rows of e] @ w[e], [A, N]: one bmm (`how` = rows per group), one
    grouped GEMM (`how` = offsets), or one mm per group into slices of a preallocated output,
    on this thread (None) or spread over threads ("threads"). `into`: add the product to it
    instead (the per-group engines with addmm, no [A, N] temporary) and return it."""
    if isinstance(how, int):
        out_AN = torch.bmm(a_AK.reshape(len(counts_E), how, a_AK.shape[1]), w_EKN).reshape(a_AK.shape[0], w_EKN.shape[2])
        return out_AN if into is None else into.add_(out_AN)
    if isinstance(how, torch.Tensor):
        out_AN = torch._grouped_mm(a_AK, w_EKN, offs=how)
        return out_AN if into is None else into.add_(out_AN)
    out_AN = a_AK.new_empty(a_AK.shape[0], w_EKN.shape[2]) if into is None else into  # every row is in a group: all written

    def product(a_NK, w_KN, out_NN):
        return torch.mm(a_NK, w_KN, out=out_NN) if into is None else torch.addmm(out_NN, a_NK, w_KN, out=out_NN)

    if how == "threads":  # the groups' views made in one call each (split, unbind), not three slicings per group
        a_parts, out_parts, w_parts = a_AK.split(counts_E), out_AN.split(counts_E), w_EKN.unbind(0)
        group_threads.run(counts_E, lambda e, rows: product(a_parts[e], w_parts[e], out_parts[e]))
        return out_AN
    for e, rows in groups(counts_E):
        product(a_AK[rows], w_EKN[e], out_AN[rows])
    return out_AN


def weight_grad(a_AK: torch.Tensor, g_AN: torch.Tensor, counts_E: list[int], how, n_experts: int) -> torch.Tensor:
    """grad_w[e] = a[rows of e]^T @ g[rows of e], [E, K, N]; zero for an expert without rows.
    `how` as in `rows_times_weights`."""
    if isinstance(how, int):
        a_ENK = a_AK.reshape(n_experts, how, a_AK.shape[1])
        return torch.bmm(a_ENK.transpose(1, 2), g_AN.reshape(n_experts, how, g_AN.shape[1]))
    if isinstance(how, torch.Tensor):
        return torch._grouped_mm(a_AK.t(), g_AN, offs=how)
    new = torch.zeros if 0 in counts_E else torch.empty
    out_EKN = new(n_experts, a_AK.shape[1], g_AN.shape[1], dtype=a_AK.dtype, device=a_AK.device)
    if how == "threads":
        a_parts, g_parts, out_parts = a_AK.split(counts_E), g_AN.split(counts_E), out_EKN.unbind(0)
        group_threads.run(counts_E, lambda e, rows: torch.mm(a_parts[e].t(), g_parts[e], out=out_parts[e]))
        return out_EKN
    for e, rows in groups(counts_E):
        torch.mm(a_AK[rows].t(), g_AN[rows], out=out_EKN[e])
    return out_EKN
