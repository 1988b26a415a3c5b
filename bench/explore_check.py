"""Does the explorer's ranking hold on real hardware? Profile the top designs of a CPU-sized
sweep and compare the measured order of tokens/s with the predicted one.

    .venv/bin/python bench/explore_check.py [--sweep specs/sweeps/cpu-tiny.yaml] [--top 8] [--spread]

`--spread` profiles designs spread over the whole predicted ranking (best to worst) instead:
the best few are often closer to one another than the machine's noise.

The sweep is explored (vectorised simulator, shipped calibration of its backend applied, as
`moespec profile` applies it), its best `--top` designs by predicted tokens/s are written as
specs and each is profiled for real on the sweep's world (`moespec profile --nproc`). Prints
both figures per design and Spearman's rank correlation (1: the same order).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moespec.explore import explore, load_sweep  # noqa: E402
from moespec.explore.space import DesignSpace, resolve_spec  # noqa: E402
from moespec.sim.calibration import backend_with_calibration  # noqa: E402
from moespec.spec.emit import plan_to_yaml  # noqa: E402
from moespec.profiling.report import MIN_TIMED_STEPS  # noqa: E402


def ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def spearman(a, b) -> float:
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(ROOT / "specs/sweeps/cpu-tiny.yaml"))
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--steps", type=int, default=MIN_TIMED_STEPS, help="timed steps per design (moespec profile's minimum)")
    parser.add_argument("--spread", action="store_true",
                        help="profile --top designs spread evenly over the whole predicted ranking instead of the best ones")
    args = parser.parse_args()
    sweep = load_sweep(args.sweep)
    calibrated = backend_with_calibration(sweep.backend, "auto", world=sweep.backend.num_devices)
    sweep = dataclasses.replace(sweep, backend=calibrated)
    space = DesignSpace(sweep)
    result = explore(sweep, top=space.size if args.spread else args.top, rank_by="tokens_per_s")
    rows = result.top.rows()
    if args.spread:  # every k-th of the ranking, best and worst included
        rows = [rows[int(i)] for i in np.unique(np.linspace(0, len(rows) - 1, args.top).round())]
    which = "spread over the ranking" if args.spread else "the best"
    print(f"{sweep.name}: {result.designs} designs on {calibrated.name} (calibration: {calibrated.calibration}); "
          f"profiling {len(rows)} ({which}) by predicted tokens/s")  # fmt: skip
    predicted, measured = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            plan = resolve_spec(space.design_spec(row["design"]))
            world = plan.parallel.world
            path = Path(tmp) / f"design-{row['design']}.yaml"
            path.write_text(plan_to_yaml(plan))
            done = subprocess.run([sys.executable, "-m", "moespec", "profile", str(path), "--nproc", str(world), "--json",
                                   "--steps", str(args.steps), "--warmup", "3", "--trace-steps", "0", "--out", str(Path(tmp) / "out")],
                                  capture_output=True, text=True, cwd=ROOT, timeout=900)  # fmt: skip
            if done.returncode:
                raise SystemExit(f"design {row['design']}: {done.stderr.strip().splitlines()[-1]}")
            report = json.loads(done.stdout)
            predicted.append(row["tokens_per_s"])
            measured.append(report["measured"]["tokens_per_s"])
            axes = ", ".join(f"{name.split('.')[-1]}={row[name]}" for name in result.front.axis_values)
            print(f"design {row['design']:>4} ({axes}): predicted {predicted[-1]:>9,.0f} tokens/s, "
                  f"measured {measured[-1]:>9,.0f}", flush=True)  # fmt: skip
    print(f"Spearman rank correlation, predicted vs measured tokens/s over {len(rows)} designs: {spearman(predicted, measured):+.2f}")


if __name__ == "__main__":
    main()
