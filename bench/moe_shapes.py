"""The shapes `bench/moe_layer.py` (and moe_threads, moe_stages, base_solver) run: named sets,
each with when it was chosen against what was tuned on it, and `--shape D,F,E,K,T` for one's
own. Kept apart so that what a figure was judged on reads in one place."""

from __future__ import annotations

import argparse

# From coarse-grained (Mixtral-like: few wide experts) to fine-grained (DeepSeek-like). The
# kernel was tuned on these four ("tuned") and on the three shapes of issue 13 ("issue");
# GRID holds shapes chosen before any measurement, from the designs users hit (E 8-128, k 1-8,
# T 2048 and 8192, d_model 256-1024, coarse and fine d_ff), on which nothing was tuned.
SHAPES = [
    {"name": "coarse", "d": 512, "f": 1024, "E": 8, "k": 2, "tokens": 4096},
    {"name": "medium", "d": 512, "f": 512, "E": 16, "k": 4, "tokens": 4096},
    {"name": "fine-32", "d": 512, "f": 256, "E": 32, "k": 8, "tokens": 2048},
    {"name": "fine", "d": 512, "f": 256, "E": 64, "k": 8, "tokens": 2048},
    {"name": "issue-1", "d": 384, "f": 768, "E": 32, "k": 1, "tokens": 3072},
    {"name": "issue-2", "d": 256, "f": 256, "E": 128, "k": 2, "tokens": 4096},
    {"name": "issue-3", "d": 320, "f": 640, "E": 24, "k": 4, "tokens": 3072},
]
GRID = [  # each sized so that dense's step is ~0.5 s on a 2-core CPU (18 * T * D * k * F ~ 4e10 FLOPs)
    {"name": "g-e8k1", "d": 512, "f": 2048, "E": 8, "k": 1, "tokens": 2048},
    {"name": "g-e8k2", "d": 1024, "f": 512, "E": 8, "k": 2, "tokens": 2048},
    {"name": "g-e16k2", "d": 256, "f": 512, "E": 16, "k": 2, "tokens": 8192},
    {"name": "g-e16k8", "d": 256, "f": 128, "E": 16, "k": 8, "tokens": 8192},
    {"name": "g-e64k1", "d": 512, "f": 512, "E": 64, "k": 1, "tokens": 8192},
    {"name": "g-e64k8", "d": 1024, "f": 128, "E": 64, "k": 8, "tokens": 2048},
    {"name": "g-e128k2", "d": 256, "f": 512, "E": 128, "k": 2, "tokens": 8192},
    {"name": "g-e128k8", "d": 512, "f": 128, "E": 128, "k": 8, "tokens": 2048},
]
# FRESH: chosen after the thread engine and BASE's batched groups were final (2026-11-30), and
# before any of them was measured; GRID's shapes were looked at while those were built.
FRESH = [
    {"name": "f-e12k3", "d": 640, "f": 640, "E": 12, "k": 3, "tokens": 2048},
    {"name": "f-e32k4", "d": 768, "f": 384, "E": 32, "k": 4, "tokens": 2048},
    {"name": "f-e48k2", "d": 384, "f": 768, "E": 48, "k": 2, "tokens": 4096},
    {"name": "f-e96k1", "d": 512, "f": 1024, "E": 96, "k": 1, "tokens": 6144},
    {"name": "f-e256k8", "d": 256, "f": 128, "E": 256, "k": 8, "tokens": 4096},
    # added after the auction's host shortest paths and BASE's padded groups were final (ninth
    # session), before they were measured: token counts that do not divide over the experts
    {"name": "f-e7k2", "d": 256, "f": 512, "E": 7, "k": 2, "tokens": 4100},
    {"name": "f-e10k1", "d": 384, "f": 768, "E": 10, "k": 1, "tokens": 3003},
    {"name": "f-e48k4", "d": 512, "f": 256, "E": 48, "k": 4, "tokens": 2000},
]
# UNSEEN: chosen on 2026-11-30 after the OpenMP spin cap and malloc change were final, before
# any of them was measured; nothing was tuned on them.
UNSEEN = [
    {"name": "u-e20k2", "d": 448, "f": 896, "E": 20, "k": 2, "tokens": 3072},
    {"name": "u-e40k6", "d": 320, "f": 192, "E": 40, "k": 6, "tokens": 4096},
    {"name": "u-e160k4", "d": 384, "f": 128, "E": 160, "k": 4, "tokens": 4096},
    {"name": "u-e6k1", "d": 768, "f": 1536, "E": 6, "k": 1, "tokens": 3000},
    {"name": "u-e24k8", "d": 256, "f": 320, "E": 24, "k": 8, "tokens": 3072},
]
ALL = SHAPES + GRID + FRESH + UNSEEN  # every named shape (--set all, --ops, base_solver.py --layer)


def parse_shape(text: str) -> dict:
    """`--shape D,F,E,K,T`: a shape dict like the sets', named after its numbers."""
    try:
        d, f, e, k, t = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected D,F,E,K,T (five integers), got {text!r}") from None
    return {"name": f"d{d}f{f}e{e}k{k}t{t}", "d": d, "f": f, "E": e, "k": k, "tokens": t}


def add_shape_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The shape-naming CLI of the benches that take shapes as positional names (moe_threads,
    moe_ceiling): names from these sets, `--shape` for one's own, `--steps`, `--json`."""
    parser.add_argument("names", nargs="*", help="shape names from bench/moe_shapes.py")
    parser.add_argument("--shape", action="append", default=[], type=parse_shape, metavar="D,F,E,K,T", help="your own shape; repeatable")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def chosen_shapes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict]:
    """The named shapes, then the `--shape` ones; a usage error (exit 2) for an unknown name,
    none at all, or no timed step."""
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: at least one timed step")
    shapes = {s["name"]: s for s in ALL}
    unknown = [n for n in args.names if n not in shapes]
    if unknown or not (args.names or args.shape):
        parser.error(f"give shape names ({', '.join(shapes)}) or --shape; unknown: {unknown}")
    return [shapes[n] for n in args.names] + args.shape
