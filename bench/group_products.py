"""One dropless product on many small groups: where the thread engine loses to the capacity
path's bmm (issue 13, issue-2: 64 rows per expert, E 128). Medians in ms, interleaved.

    python bench/group_products.py                      # E 128, 64 rows, 256 x 256
    python bench/group_products.py --experts 256 --rows 32 --width 128

Rows, two threads:
- bmm: the capacity path's product, one `bmm` on [E, N, K] (MKL's strided batch);
- threads (equal) / threads (uneven): the thread engine on equal groups / on multinomial
  groups of the same total (model/group_threads.py: each group's `mm` on one thread);
- grouped_mm (uneven): `torch._grouped_mm` on those groups, split over both threads per group;
- two bmm halves / two mm loops: each thread runs half the experts as one `bmm`, or as a loop
  of `mm`s, on one intra-op thread: the threading alone, without the engine;
Rows, one thread: mm loop against bmm, the per-group call alone.
If the two halves rows match bmm and threads, the threading costs nothing and the loss is the
per-group call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import moespec  # before torch: the OpenMP spin cap moespec runs with
import torch

from moespec.malloc_tuning import keep_freed_memory
from moespec.model import group_matmuls as G


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--rows", type=int, default=64, help="rows per expert (equal groups; uneven ones have the same total)")
    parser.add_argument("--width", type=int, default=256, help="K = N of each product")
    parser.add_argument("--repeats", type=int, default=15, help="rounds of every row; the first 3 warm up and are not counted")
    args = parser.parse_args()
    if args.repeats < 4:
        parser.error(f"--repeats {args.repeats}: the first 3 rounds warm up, so at least 4 are needed")
    keep_freed_memory()
    E, n, K = args.experts, args.rows, args.width
    generator = torch.Generator().manual_seed(0)
    a_AK, w_EKN = torch.randn(E * n, K, generator=generator), torch.randn(E, K, K, generator=generator)
    equal = [n] * E
    uneven = torch.multinomial(torch.ones(E), E * n, replacement=True, generator=generator).bincount(minlength=E).tolist()
    out_AN = torch.empty(E * n, K)
    half = E // 2
    pool = ThreadPoolExecutor(1, initializer=lambda: torch.set_num_threads(1))
    threads = torch.get_num_threads()

    def on_two(part) -> None:
        """part(first, last) on this thread and the pool's, one intra-op thread each."""
        torch.set_num_threads(1)
        try:
            other = pool.submit(part, 0, half)
            part(half, E)
            other.result()
        finally:
            torch.set_num_threads(threads)

    def bmm_part(lo: int, hi: int) -> None:
        torch.bmm(a_AK[lo * n : hi * n].view(hi - lo, n, K), w_EKN[lo:hi], out=out_AN[lo * n : hi * n].view(hi - lo, n, K))

    def mm_part(lo: int, hi: int) -> None:
        with torch.no_grad():
            for e in range(lo, hi):
                torch.mm(a_AK[e * n : (e + 1) * n], w_EKN[e], out=out_AN[e * n : (e + 1) * n])

    def one_thread(part):
        def run() -> None:
            torch.set_num_threads(1)
            try:
                part(0, E)
            finally:
                torch.set_num_threads(threads)
        return run

    cases = {
        "bmm": lambda: bmm_part(0, E),
        "threads (equal)": lambda: G.rows_times_weights(a_AK, w_EKN, equal, "threads"),
        "threads (uneven)": lambda: G.rows_times_weights(a_AK, w_EKN, uneven, "threads"),
        "grouped_mm (uneven)": lambda: G.rows_times_weights(a_AK, w_EKN, uneven, G.offsets(uneven, a_AK.device)),
        "two bmm halves": lambda: on_two(bmm_part),
        "two mm loops": lambda: on_two(mm_part),
        "1 thread: bmm": one_thread(bmm_part),
        "1 thread: mm loop": one_thread(mm_part),
    }
    times = {name: [] for name in cases}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append(1e3 * (time.perf_counter() - start))
    print(f"moespec {moespec.__version__}, torch {torch.__version__}; E {E}, {n} rows per expert, {K} x {K}, {threads} threads; median ms of {args.repeats - 3}")
    for name, ms in times.items():
        print(f"  {name:<20} {statistics.median(ms[3:]):7.2f}")


if __name__ == "__main__":
    main()
