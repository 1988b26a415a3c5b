"""Benchmark: BASE balanced assignment, our auction against scipy's exact solver, in one run.

Scores are router-like affinities `x @ W` (x: [T, D], W: [D, E], standard normal), as a BASE
layer sees them. scipy solves the same problem exactly as a [T, T] linear assignment with
every expert column repeated T/E times (Hungarian/LAPJV); we time only its solve call, not
building the repeated matrix, so the speed-up is if anything understated.

    python bench/base_solver.py [--tokens 4096 --experts 64 --dim 256 --repeats 3] [--json]
    python bench/base_solver.py --warm 6   # cold against warm-started prices over 6 steps
    python bench/base_solver.py --rounds --threads 2 --repeats 5   # compiled rounds against numpy's and torch's
    python bench/base_solver.py --filler --experts 160   # T not a multiple of E: the filler rows' cost
    python bench/base_solver.py --layer u-e160k4 f-e256k8  # on a bench/moe_layer.py BASE layer's own router

`--filler`: a group of T tokens with T % E != 0 is padded with E - T % E constant rows
(`balanced_expert_index`); they are indifferent between experts, so they all bid for the same
cheapest one and are placed one augmenting path at a time. Times the auction at token counts
around 25 * E with and without filler rows, same router weights.

`--layer SHAPE...`: the auction as a BASE layer of bench/moe_layer.py runs it (k = 1): that
layer's router scores of fresh tokens each step, warm-started from the previous step's prices
(`balanced_expert_index`, padding included); the best of three medians over 9 steps.

`--warm N`: N steps of fresh tokens through the same router weights (as in training, where
the weights move little between steps), each solved cold (prices from zero) and warm (prices
from the previous step's solution, what a BASE router does), median times and rounds.

torch runs on one CPU thread by default (`--threads`): scipy's solver is single-threaded, so
that is like for like, and on a small shared machine torch's spinning worker threads make
timings erratic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from moespec.model.auction import auction_assignment  # noqa: E402
from moespec.model.balanced_routers import padded_scores  # noqa: E402


def router_scores(tokens: int, experts: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(tokens, dim, generator=generator)
    w_DE = torch.randn(dim, experts, generator=generator)
    return x_TD @ w_DE  # [T, E] float32


def time_ours(scores_TE: torch.Tensor, repeats: int) -> tuple[list[float], object]:
    """Wall times of auction_assignment, one untimed warm-up call first."""
    sync = torch.cuda.synchronize if scores_TE.is_cuda else (lambda: None)
    result = auction_assignment(scores_TE)
    sync()
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = auction_assignment(scores_TE)
        sync()
        times_s.append(time.perf_counter() - start)
    return times_s, result


def time_scipy(scores_TE: torch.Tensor, repeats: int):
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    T, E = scores_TE.shape
    scores_np = scores_TE.double().cpu().numpy()
    slots_TT = np.repeat(scores_np, T // E, axis=1)  # column e*M + i is slot i of expert e
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, slot_T = linear_sum_assignment(slots_TT, maximize=True)
        times_s.append(time.perf_counter() - start)
    return times_s, torch.from_numpy(slot_T // (T // E))


def objective(scores_TE: torch.Tensor, expert_index_T: torch.Tensor) -> float:
    scores64_TE = scores_TE.double().cpu()
    return float(scores64_TE.gather(1, expert_index_T.cpu().view(-1, 1)).sum())


def run(tokens: int, experts: int, dim: int, repeats: int, seed: int, device: str) -> dict:
    scores_TE = router_scores(tokens, experts, dim, seed)
    scipy_s, scipy_index_T = time_scipy(scores_TE, repeats)
    ours_s, result = time_ours(scores_TE.to(device), repeats)
    ours_index_T = result.expert_index_T.cpu()
    balanced = bool((torch.bincount(ours_index_T, minlength=experts) == tokens // experts).all())
    ours_obj = objective(scores_TE, ours_index_T)
    scipy_obj = objective(scores_TE, scipy_index_T)
    scipy_med, ours_med = statistics.median(scipy_s), statistics.median(ours_s)
    return {
        "tokens": tokens,
        "experts": experts,
        "dim": dim,
        "repeats": repeats,
        "device": str(scores_TE.to(device).device),
        "torch_threads": torch.get_num_threads(),
        "scipy_s": scipy_med,
        "ours_s": ours_med,
        "scipy_s_all": scipy_s,
        "ours_s_all": ours_s,
        "speedup": scipy_med / ours_med,
        "ours_objective": ours_obj,
        "scipy_objective": scipy_obj,
        "gap_percent": 100.0 * (scipy_obj - ours_obj) / abs(scipy_obj),
        "bound_percent": 100.0 * result.optimality_bound / abs(scipy_obj),
        "eps": result.eps,
        "rounds": result.rounds,
        "augmentations": result.augmentations,
        "searches": result.searches,
        "phases": result.phases,
        "balanced": balanced,
    }


def warm_steps(tokens: int, experts: int, dim: int, steps: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    w_DE = torch.randn(dim, experts, generator=generator)
    cold_s, warm_s, rounds, prices = [], [], {"cold": [], "warm": []}, None
    for step in range(steps):
        scores_TE = torch.randn(tokens, dim, generator=generator) @ w_DE
        for name, times, start in (("cold", cold_s, None), ("warm", warm_s, prices)):
            begin = time.perf_counter()
            result = auction_assignment(scores_TE, price_init_E=start)
            times.append(time.perf_counter() - begin)
            rounds[name].append(result.rounds + result.augmentations)
        prices = result.price_E
    return {"tokens": tokens, "experts": experts, "steps": steps,
            "cold_ms": 1e3 * statistics.median(cold_s[1:]), "warm_ms": 1e3 * statistics.median(warm_s[1:]),
            "cold_rounds": statistics.median(rounds["cold"][1:]), "warm_rounds": statistics.median(rounds["warm"][1:])}  # fmt: skip


# Not the shape the numpy rounds were timed on while written (T 4096, E 256): chosen after, and
# before the compiled kernels were written (2026-12-01).
ROUNDS_SHAPES = [(2048, 32, 512), (6144, 96, 384), (8192, 16, 256), (3072, 192, 128), (1536, 8, 1024)]


ENGINES = {"compiled": (True, True), "numpy": (True, False), "torch": (False, False)}  # (HOST_ROUNDS, COMPILED)


def round_engines(tokens: int, experts: int, dim: int, repeats: int) -> dict:
    """Median ms of the auction on CPU with its rounds and paths compiled (auction_kernels, the
    default where built), in numpy (auction_host) and with torch rounds, interleaved."""
    from moespec.model import auction_host, auction_kernels

    generator = torch.Generator().manual_seed(tokens + experts)
    scores_TE = torch.randn(tokens, dim, generator=generator) @ (torch.randn(dim, experts, generator=generator) / dim**0.5)
    times, results = {name: [] for name in ENGINES}, {}
    try:
        for _ in range(repeats + 1):  # the first of each is a warm-up
            for name, (host, compiled) in ENGINES.items():
                auction_host.HOST_ROUNDS["enabled"], auction_kernels.COMPILED["enabled"] = host, compiled
                start = time.perf_counter()
                results[name] = auction_assignment(scores_TE).expert_index_T
                times[name].append(time.perf_counter() - start)
    finally:
        auction_host.HOST_ROUNDS["enabled"], auction_kernels.COMPILED["enabled"] = True, True
    row = {"tokens": tokens, "experts": experts, "compiled_built": auction_kernels.available()}
    row.update({f"{name}_ms": 1e3 * statistics.median(times[name][1:]) for name in ENGINES})
    row["same"] = all(torch.equal(results["compiled"], results[name]) for name in ENGINES)
    return row


def filler_cost(experts: int, dim: int, repeats: int, seed: int, device: str = "cpu") -> list[dict]:
    """Auction time at T = 25E - 1 ... 26E + 1 (filler rows: E - T % E unless T % E == 0)."""
    generator = torch.Generator().manual_seed(seed)
    w_DE = torch.randn(dim, experts, generator=generator)
    rows = []
    for tokens in (25 * experts, 25 * experts + 1, 25 * experts + experts // 2, 26 * experts - 1, 26 * experts):
        filler = -tokens % experts
        scores_TE = torch.randn(tokens, dim, generator=generator) @ w_DE
        times_s, result = time_ours(padded_scores(scores_TE).to(device), repeats)  # as balanced_expert_index pads
        rows.append({"tokens": tokens, "experts": experts, "filler_rows": filler, "ours_ms": 1e3 * statistics.median(times_s),
                     "rounds": result.rounds, "augmentations": result.augmentations, "searches": result.searches})
    return rows


def layer_auctions(names: list[str], seed: int) -> list[dict]:
    """Auction ms per step on bench/moe_layer.py's BASE layers (module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import moe_layer  # noqa: PLC0415  the bench's shapes and layer builder

    from moespec.model.balanced_routers import balanced_expert_index
    from moespec.spec.plan import BaseRouter

    shapes = {s["name"]: s for s in moe_layer.ALL}
    rows = []
    for name in names:
        shape = dict(shapes[name], k=1)
        torch.manual_seed(seed)
        _, layer = moe_layer.ours(shape, dropless=True, router=BaseRouter(shuffle=False))
        with torch.no_grad():
            scores = [layer.router.gate(torch.randn(shape["tokens"], shape["d"])) for _ in range(10)]
        medians = []
        for _ in range(3):
            price_E, times_ms = None, []
            for scores_TE in scores:
                start = time.perf_counter()
                _, price_E = balanced_expert_index(scores_TE, eps=None, price_init_E=price_E)
                times_ms.append(1e3 * (time.perf_counter() - start))
            medians.append(statistics.median(times_ms[1:]))
        rows.append({"shape": name, "tokens": shape["tokens"], "experts": shape["E"],
                     "filler_rows": -shape["tokens"] % shape["E"], "ours_ms": min(medians)})
    return rows


def emit(rows: list[dict], as_json: bool, line) -> int:
    """One JSON document of the rows, or one line of text each."""
    print(json.dumps(rows, indent=2) if as_json else "\n".join(line(r) for r in rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256, help="router input width D")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="device for our solver (scipy is CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, 0: torch's default")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--warm", type=int, default=0, metavar="STEPS", help="cold against warm-started prices over STEPS steps")
    parser.add_argument("--layer", nargs="+", metavar="SHAPE", help="bench/moe_layer.py shape names: the auction on their BASE layers' own router")
    parser.add_argument("--filler", action="store_true", help="T %% E != 0: the cost of the filler rows that pad the group")
    parser.add_argument("--rounds", action="store_true",
                        help="CPU: the compiled rounds and paths (the default) against numpy's and torch's, at shapes none was tuned on")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.rounds:
        rows = [round_engines(t, e, d, args.repeats) for t, e, d in ROUNDS_SHAPES]
        return emit(rows, args.json, lambda r: (
            f"T={r['tokens']:5d} E={r['experts']:3d}: compiled {r['compiled_ms']:6.1f} ms, numpy {r['numpy_ms']:6.1f} ms, "
            f"torch rounds {r['torch_ms']:6.1f} ms; numpy / compiled {r['numpy_ms'] / r['compiled_ms']:.2f}x; "
            f"same assignment: {r['same']}" + ("" if r["compiled_built"] else " (compiled kernels not built: numpy ran twice)")))
    if args.layer:
        rows = layer_auctions(args.layer, args.seed)
        return emit(rows, args.json, lambda r: (
            f"{r['shape']:<9} T={r['tokens']:5d} E={r['experts']:3d}, {r['filler_rows']:3d} filler rows: {r['ours_ms']:6.1f} ms per step"))
    if args.filler:
        rows = filler_cost(args.experts, args.dim, args.repeats, args.seed, args.device)
        return emit(rows, args.json, lambda r: (
            f"T={r['tokens']:5d} E={r['experts']:3d}, {r['filler_rows']:3d} filler rows: {r['ours_ms']:6.1f} ms, "
            f"{r['rounds']} rounds + {r['augmentations']} augmenting paths in {r['searches']} searches"))
    if args.warm:
        rows = [warm_steps(t, e, args.dim, args.warm, args.seed) for t, e in ((2048, 8), (4096, 16), (4096, 64), (8192, 128))]
        return emit(rows, args.json, lambda r: (
            f"T={r['tokens']:5d} E={r['experts']:3d}: cold {r['cold_ms']:7.1f} ms ({r['cold_rounds']:.0f} rounds + paths), "
            f"warm {r['warm_ms']:7.1f} ms ({r['warm_rounds']:.0f}); warm/cold {r['warm_ms'] / r['cold_ms']:.2f}"))
    report = run(args.tokens, args.experts, args.dim, args.repeats, args.seed, args.device)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"BASE balanced assignment, T={args.tokens} E={args.experts} D={args.dim}, median of "
          f"{args.repeats}, ours on {report['device']} ({report['torch_threads']} threads)")
    print(f"  scipy linear_sum_assignment : {report['scipy_s'] * 1e3:9.1f} ms")
    print(f"  ours (auction)              : {report['ours_s'] * 1e3:9.1f} ms")
    print(f"  speed-up                    : {report['speedup']:9.1f} x")
    print(f"  scipy objective (optimum)   : {report['scipy_objective']:.6f}")
    print(f"  our objective               : {report['ours_objective']:.6f}")
    print(f"  optimality gap              : {report['gap_percent']:.6f} % "
          f"(guaranteed <= {report['bound_percent']:.4f} %, eps={report['eps']:.4g})")
    print(f"  rounds / augmentations (searches) / phases: {report['rounds']} / "
          f"{report['augmentations']} ({report['searches']}) / {report['phases']}; balanced: {report['balanced']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
