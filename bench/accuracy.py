"""Simulator accuracy: profile every tiny example spec at world 1 and 2 and print the predicted
step time beside the measured one, with the median and max relative error.

    .venv/bin/python bench/accuracy.py [--calibration auto|none|FILE] [--steps N] [--repeat R]

Each run is `moespec profile SPEC --json` (a real training step on real gloo ranks), so the
figures are what a user sees. World 2 runs the same design with dp 2 (`--world 2`); a spec
that already uses 2 ranks (tiny-ep) is profiled at world 1 with ep 1. `--repeat R` profiles
each R times and takes the median measured step (this machine's run-to-run noise is ~10%).
Target (issue 6): median |error| at most 10% after calibration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOESPEC = [sys.executable, "-m", "moespec"]


def profile(spec: Path, world: int, *, calibration: str, steps: int) -> dict:
    args = ["profile", str(spec), "--json", "--steps", str(steps), "--warmup", "3", "--trace-steps", "0",
            "--calibration", calibration, "--out", f"/tmp/moespec-accuracy/{spec.stem}-w{world}"]  # fmt: skip
    needs = 2 if spec.stem == "tiny-ep" else 1
    if world != needs:
        args += ["--world", str(world)] + (["--ep", "1"] if world == 1 else [])
    if world > 1:
        args += ["--nproc", str(world)]
    done = subprocess.run([*MOESPEC, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if done.returncode:
        raise SystemExit(f"{spec.name} world {world}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    specs = sorted((ROOT / "specs").glob("tiny-*.yaml"))
    print(f"{'spec':<20} {'world':>5} {'measured ms':>12} {'predicted ms':>13} {'error':>8}")
    errors = []
    for spec in specs:
        for world in (1, 2):
            reports = [profile(spec, world, calibration=args.calibration, steps=args.steps) for _ in range(args.repeat)]
            report = reports[0]
            measured = statistics.median(r["comparison"][0]["measured"] for r in reports)
            predicted = report["comparison"][0]["predicted"]
            error = (predicted - measured) / measured
            errors.append(abs(error))
            print(f"{spec.stem:<20} {world:>5} {measured * 1e3:>12.2f} {predicted * 1e3:>13.2f} {error:>+8.1%}", flush=True)
    print(f"calibration: {report['calibration']}")
    print(f"step time |relative error| over {len(errors)} runs: median {statistics.median(errors):.1%}, max {max(errors):.1%}")


if __name__ == "__main__":
    main()
