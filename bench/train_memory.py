"""Per-rank memory of expert parallelism, measured: a ~1B-parameter MoE trained one step with
ep 2 on 2 CPU ranks (each builds only its 10 of 20 experts per layer) beside the same model in
one process (every expert). Prints each run's peak resident set per rank and their ratio.

    .venv/bin/python bench/train_memory.py [--steps 1] [--keep SPEC_PATH]

Both runs are `moespec train SPEC --json` and read `peak_memory_bytes_per_rank` (getrusage's
max RSS): weights, gradients, AdamW state, activations and everything torch and Python hold.
Target (issue 16): the ep-2 rank's peak at most 60% of the unsharded model's. Needs ~18 GB of
free memory (the unsharded run holds ~1.04B x 16 bytes); run it with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPEC = """version: 1
name: moe-1b-ep2
description: "~1.04B parameters: 8 MoE layers of 20 SwiGLU experts (d_ff 2048) at d_model 1024; dp 2, ep 2."
model: {vocab_size: 256, d_model: 1024, n_layers: 8, n_heads: 16, d_ff: 4096, seq_len: 32, activation: swiglu}
moe:
  placement: {type: every, every: 1, offset: 0}
  experts: {count: 20, d_ff: 2048}
  router: {type: topk, k: 2}
  capacity: {factor: 1.25}
parallelism: {dp: 2, ep: 2, micro_batch: 1, global_batch: 2}
"""


def train(spec: Path, *flags: str) -> tuple[dict, float]:
    env = {**os.environ, "COLUMNS": "200"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moespec", "train", str(spec), "--json", *flags], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=3600)  # fmt: skip
    if done.returncode:
        sys.exit(f"moespec train {' '.join(flags)} failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="also write the generated spec here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "moe-1b-ep2.yaml"
        spec.write_text(SPEC)
        if args.keep:
            args.keep.write_text(SPEC)
        steps = ["--steps", str(args.steps)]
        whole, whole_s = train(spec, *steps, "--single-process")
        split, split_s = train(spec, *steps, "--nproc", "2")
    gib = 2**30
    params = whole["params"]["total"]
    peak_whole = max(whole["peak_memory_bytes_per_rank"])
    peaks = split["peak_memory_bytes_per_rank"]
    print(f"model: {params:,} parameters (16 bytes each with gradients and AdamW: {params * 16 / gib:.1f} GiB)")
    print(f"one process, every expert:      peak RSS {peak_whole / gib:6.2f} GiB   ({whole_s:.0f} s)")
    for rank, peak in enumerate(peaks):
        print(f"ep 2, rank {rank} (its 10 experts): peak RSS {peak / gib:6.2f} GiB   ratio {peak / peak_whole:.2f}")
    print(f"({split_s:.0f} s for the ep-2 run; target: ratio <= 0.60)")
    print(f"losses: one process {whole['last_loss']:.4f}, ep 2 {split['last_loss']:.4f}")


if __name__ == "__main__":
    main()
