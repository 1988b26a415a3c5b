"""Simulator accuracy: profile specs for real and print the predicted step time beside the
measured one, with the median and max relative error and the rank correlation.

    .venv/bin/python bench/accuracy.py [--suite tiny|heldout|fresh|skew] [--only NAME] [--calibrate | --calibration auto|none|FILE]
                                       [--steps N] [--repeat R]

Suites: `tiny` (default) profiles every tiny example spec at world 1 and 2: they resemble the
small models the calibration is fitted on, so their error is an in-sample figure. `heldout`
profiles the 12 specs of bench/heldout/ (d_model 64-512, seq 64-512, 4-64 experts, top-1 to
top-8, capacity and dropless, shared experts, gradient accumulation, BASE, ep 1 and 2, world
1 and 2, fp32 and bf16), each at its own world: none of them is a model any calibration is
fitted on, and the bench prints the fit set (the calibration's micro-benchmarks and toy
models) beside them. Calibrate on the machine first (`moespec calibrate --backend cpu-local
--nproc 1` and `--nproc 2`, or `--calibrate`, which does both into a temporary folder in the
same run): a calibration from another machine, or from this one on another day of a shared
VM, carries that machine's speed.

Each run is `moespec profile SPEC --json` (a real training step on real gloo ranks), so the
figures are what a user sees. World 2 runs the same design with dp 2 (`--world 2`); a spec
that already uses 2 ranks (tiny-ep) is profiled at world 1 with ep 1. `--repeat R` profiles
each R times, in R passes over the suite, and takes the median measured step (this machine's
run-to-run noise is ~10%, and a 2-core VM can run both cores slower for minutes after minutes
of load: passes spread that over several specs' repeats instead of all of one spec's).
Targets (issue 12): held-out median |error| <= 10%, max <= 20%, Spearman >= 0.9.

`machine` is the profile's probe (a fixed fp32 Linear on one thread) against the
calibration's, and `at cal.` the error against each measured step scaled by it: the step as it
would have run at the machine's speed during calibration, if the probe tracked the step's
speed. It is a diagnostic, not a prediction; the plain `error` is the figure a user sees. On
the 2-core VM this was written on it did not track it reliably (two held-out runs of
2026-11-30: plain median 6.6% and 17.6%, `at cal.` 10.8% and 13.5%): one thread on a fixed
Linear and two threads on a step's host-bound ops slow down differently, so the probe cannot
be used to correct a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOESPEC = [sys.executable, "-m", "moespec"]


def profile(spec: Path, world: int | None, *, calibration: str, steps: int, device: str = "cpu", backend: str = "cpu-local") -> dict:
    """`moespec profile` of `spec` at `world` ranks (None: the spec's own world)."""
    from moespec.spec import load_plan

    needs = load_plan(spec).parallel.world
    world = world or needs
    args = ["profile", str(spec), "--json", "--steps", str(steps), "--warmup", "3", "--trace-steps", "0",
            "--calibration", _calibration_for(calibration, backend, world), "--out", f"/tmp/moespec-accuracy/{spec.stem}-w{world}",
            "--device", device, "--backend", backend]  # fmt: skip
    if world != needs:
        args += ["--world", str(world)] + (["--ep", "1"] if world == 1 else [])
    if world > 1:
        args += ["--nproc", str(world)]
    done = subprocess.run([*MOESPEC, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if done.returncode:
        raise SystemExit(f"{spec.name} world {world}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)


def tiny_runs() -> list[tuple[Path, int | None]]:
    """Every tiny spec at world 1 and 2 (data parallel), except the tensor- and pipeline-
    parallel ones, which run in their own layout when it takes at most 2 ranks (their split is
    the spec's point) and are left out, with a note, when it takes more: this 2-core machine
    would run 4 ranks oversubscribed, which judges the machine, not the model."""
    from moespec.spec import load_plan

    runs, left_out = [], []
    for spec in sorted((ROOT / "specs").glob("tiny-*.yaml")):
        parallel = load_plan(spec).parallel
        if parallel.tp * parallel.pp == 1:
            runs += [(spec, 1), (spec, 2)]
        elif parallel.world <= 2:
            runs.append((spec, None))
        else:
            left_out.append(f"{spec.stem} ({parallel.world} ranks)")
    if left_out:
        print(f"left out (more than 2 ranks): {', '.join(left_out)}")
    return runs


def calibrate_now(args) -> str:
    """`moespec calibrate` at 1 and 2 ranks into a temporary folder, named as the shipped
    files are; returns the folder (profile() picks the file for each run's world)."""
    folder = Path(tempfile.mkdtemp(prefix="moespec-accuracy-cal-"))
    for nproc, name in ((1, f"{args.backend}.nproc1.json"), (2, f"{args.backend}.json")):
        done = subprocess.run([*MOESPEC, "calibrate", "--backend", args.backend, "--nproc", str(nproc), "--device", args.device,
                               "--out", str(folder / name)], capture_output=True, text=True, cwd=ROOT, timeout=900)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"calibrate --nproc {nproc}: {done.stderr.strip().splitlines()[-1]}")
        print(f"calibrated at {nproc} rank(s): {folder / name}", flush=True)
    return str(folder)


def _calibration_for(choice: str, backend: str, world: int) -> str:
    """A folder from --calibrate: its file for `world` ranks; anything else as given."""
    folder = Path(choice)
    if not folder.is_dir():
        return choice
    own = folder / f"{backend}.nproc{world}.json"
    return str(own if own.is_file() else folder / f"{backend}.json")


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (no ties expected among step times): Pearson's r of the ranks."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    if len(xs) < 2:
        return float("nan")
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--suite", choices=("tiny", "heldout", "fresh", "skew"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", default="cpu-local")
    parser.add_argument("--only", default="", help="profile only the specs whose name contains this")
    parser.add_argument("--calibrate", action="store_true",
                        help="calibrate this machine first (1 and 2 ranks, into a temporary folder) and judge with those files")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from moespec.spec import load_plan
    if args.calibrate:
        args.calibration = calibrate_now(args)
    if args.suite == "skew":
        return skew(args)
    if args.suite in ("heldout", "fresh"):  # fresh: specs written after the database was finished
        runs = [(spec, None) for spec in sorted((ROOT / "bench" / args.suite).glob("*.yaml"))]
    else:
        runs = tiny_runs()
    print(f"{'spec':<24} {'world':>5} {'measured ms':>12} {'predicted ms':>13} {'error':>8} {'machine':>8} {'at cal.':>8} {'peak MiB':>9} {'mem error':>10}")
    errors, measured_all, predicted_all, memory_errors = [], [], [], []
    at_calibration, at_calibration_measured = [], []  # the model's error with the machine's drift taken out
    runs = [(spec, world) for spec, world in runs if args.only in spec.stem]
    if args.device == "cuda":  # one rank per GPU: a machine with fewer GPUs skips the larger worlds, and says so
        import torch

        gpus = torch.cuda.device_count()
        skipped = [spec.stem for spec, world in runs if (world or load_plan(spec).parallel.world) > gpus]
        runs = [(spec, world) for spec, world in runs if (world or load_plan(spec).parallel.world) <= gpus]
        if skipped:
            print(f"skipped (more ranks than the {gpus} GPU(s) here): {', '.join(skipped)}")
    # Repeats in passes over the whole suite, not back to back: a stretch of minutes when the
    # machine runs slow (a VM after minutes of load, a neighbour) then touches one repeat of
    # several specs rather than every repeat of one, and the median sets it aside.
    passes = []
    for repeat in range(args.repeat):
        passes.append([])
        for i, (spec, world) in enumerate(runs):
            passes[-1].append(profile(spec, world, calibration=args.calibration, steps=args.steps, device=args.device, backend=args.backend))
            if args.repeat > 1 and repeat < args.repeat - 1:
                print(f"  pass {repeat + 1}/{args.repeat}: {spec.stem} {passes[-1][-1]['comparison'][0]['measured'] * 1e3:.2f} ms", flush=True)
    for i, (spec, world) in enumerate(runs):
        reports = [done[i] for done in passes]
        report = reports[-1]
        measured = statistics.median(r["comparison"][0]["measured"] for r in reports)
        predicted = report["comparison"][0]["predicted"]
        error = (predicted - measured) / measured
        errors.append(abs(error))
        measured_all.append(measured)
        predicted_all.append(predicted)
        vs_cal = [r.get("machine_speed", {}).get("vs_calibration") for r in reports]
        speed, steady = f"{'-':>8}", f"{'-':>8}"
        if all(v is not None for v in vs_cal):
            speed = f"{min(vs_cal):>8.2f}"
            # each pass's step as it would have run at the calibration's speed (probe ratio)
            steady_s = statistics.median(r["comparison"][0]["measured"] * v for r, v in zip(reports, vs_cal))
            at_calibration.append(abs(predicted - steady_s) / steady_s)
            at_calibration_measured.append(steady_s)
            steady = f"{(predicted - steady_s) / steady_s:>+8.1%}"
        rows = report.get("memory_by_category", {}).get("rows", [])
        peak = next((row for row in rows if row["figure"] == "peak total"), None)  # CPU runs (MemTracker)
        memory = f"{'-':>9} {'-':>10}"
        if peak:
            memory_errors.append(abs(peak["relative_error"]))
            memory = f"{peak['measured'] / 2**20:>9.1f} {peak['relative_error']:>+10.1%}"
        print(f"{spec.stem:<24} {report['world']:>5} {measured * 1e3:>12.2f} {predicted * 1e3:>13.2f} {error:>+8.1%} {speed} {steady} {memory}",
              flush=True)  # fmt: skip
    print("peak MiB: MemTracker's tracked peak of one training step on the busiest rank; mem error: the simulator's peak against it")
    print("machine: the profile's machine probe (a fixed fp32 Linear on one thread, timed before the steps) against the calibration's: "
          "1.00 = as fast as at calibration, 0.80 = 20% slower; the slowest of the spec's passes (profile flags it drifted outside its band)")
    print(f"calibration: {report['calibration']}")
    fit = _fit_set(report["calibration"])
    print(f"fit set (the calibration's small models): {fit}")
    print(f"judged on: {args.suite} ({len(errors)} runs; {'disjoint from the fit set' if args.suite in ('heldout', 'fresh') else 'resembling the fit set: in-sample'})")
    rho = spearman(predicted_all, measured_all)
    print(f"step time |relative error|: median {statistics.median(errors):.1%}, max {max(errors):.1%}; "
          f"Spearman (predicted vs measured) {'n/a (one run)' if rho != rho else f'{rho:+.2f}'}")  # fmt: skip
    if at_calibration and len(at_calibration) == len(errors):
        rho_cal = spearman(predicted_all, at_calibration_measured)
        print(f"step time at the calibration's machine speed ('at cal.': each measured step times the probe's ratio; "
              f"the model's error with the machine's drift taken out, not a prediction): median {statistics.median(at_calibration):.1%}, "
              f"max {max(at_calibration):.1%}; Spearman {'n/a' if rho_cal != rho_cal else f'{rho_cal:+.2f}'}")  # fmt: skip
    if memory_errors:
        print(f"peak memory |relative error|: median {statistics.median(memory_errors):.1%}, max {max(memory_errors):.1%}")


def skew(args) -> None:
    """Routing skewed on purpose (bench/skew/: a hash router on byte text, dropless, ep 2):
    profile it, then predict it twice, balanced and with the load the profile measured
    (`simulate --load REPORT`): per-rank all-to-all bytes must be exact, the step within the
    calibrated error band."""
    for spec in sorted((ROOT / "bench" / "skew").glob("*.yaml")):
        report = profile(spec, None, calibration=args.calibration, steps=args.steps, backend=args.backend)
        path = Path(report["report"]) if "report" in report else None
        done = subprocess.run([*MOESPEC, "simulate", str(spec), "--json", "--backend", args.backend, "--calibration", _calibration_for(args.calibration, args.backend, report["world"]),
                               "--load", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"{spec.name}: simulate --load: {done.stderr.strip().splitlines()[-1]}")
        loaded = json.loads(done.stdout)
        measured = report["comparison"][0]["measured"]
        balanced = report["comparison"][0]["predicted"]
        predicted = loaded["time"]["step_s"]
        load = loaded["load"]
        print(f"{spec.stem}: compute imbalance {load['compute_imbalance']:.2f}, all-to-all imbalance {load['a2a_imbalance']:.2f}")
        print(f"  all-to-all bytes per rank per micro-step: measured {report['measured']['a2a_bytes_per_rank_microstep']}, "
              f"predicted from the load {load['a2a_bytes_per_rank_microstep']}")
        print(f"  step: measured {measured * 1e3:.1f} ms; predicted balanced {balanced * 1e3:.1f} ms ({balanced / measured - 1:+.1%}), "
              f"with the measured load {predicted * 1e3:.1f} ms ({predicted / measured - 1:+.1%}); "
              f"calibrated band +/-{report['calibrated_error_band']:.0%}")  # fmt: skip


def _fit_set(calibration: str | None) -> str:
    if not calibration or not Path(calibration).is_file():
        return "none (no calibration)"
    blocks = json.loads(Path(calibration).read_text())["measurements"]["blocks"]
    return ("operator micro-benchmarks (Linear, bmm, attention grids; gather, elementwise, dropless kernel, AdamW); "
            "host seconds per op fitted on the toy models " + ", ".join(b["name"] for b in blocks)
            + " (profiling/calibrate.py fit_plans: dense d 16 and 64, dropless d 16)")


if __name__ == "__main__":
    main()
