#!/usr/bin/env bash
# GPU checks for a device machine (one prepared script: calibrate, then judge on held-out specs).
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. the CUDA tests that skip without a GPU (NCCL's two-rank test needs two GPUs);
# 2. `profile --device cuda` of a dropless spec (torch._grouped_mm on CUDA, its FLOPs against
#    the simulator's) and of a capacity one;
# 3. `moespec calibrate --device cuda` for the BACKEND (default h200-cluster-4n: the device
#    machine's H200; writes profiler/calibrations/<backend>.nproc1.json, copied to OUT_DIR);
# 4. the held-out accuracy suite (bench/accuracy.py --suite heldout) against that calibration;
# 5. `train --device cuda` (NCCL, bf16 autocast per the spec): 20 steps with a checkpoint at
#    10, then a resume from it whose losses must equal the uninterrupted run's steps 11-20.
# Between 2 and 3, BASE's auction on CUDA (bench/base_solver.py): against scipy, and with filler
# rows (its augmenting paths run on host copies since 2026-11-30, compiled since 2026-12-01).
# Each step has its own time limit so the whole script stays under 9 minutes. Everything
# lands in one work folder, packed at the end into OUT_DIR/gpu-check.tgz (the device tool
# brings back 8 files at most) beside summary.txt. OUT_DIR: default $OUT, else ./gpu-check.
# Packages the machine lacks travel as wheels in .whl/ (installed to /tmp/site when present).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
work="$(mktemp -d)"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
py=.venv/bin/python
[ -x "$py" ] || py=python3
say() { echo "$*" | tee -a "$out/summary.txt"; }
nvidia-smi > "$work/nvidia-smi.txt" 2>&1 || { say "no GPU here (nvidia-smi failed)"; exit 2; }
say "torch: $("$py" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' 2>&1 | tail -1)"
# The auction's compiled kernels (setup.py; the checkout travels without its build): in place,
# as `pip install -e .` puts them. Without a compiler the numpy solver runs, the same assignments.
timeout 60 "$py" setup.py -q build_ext --inplace > "$work/build-kernels.txt" 2>&1
say "auction kernels: $("$py" -c 'from moespec.model import auction_kernels as k; print("compiled" if k.available() else "numpy (not built)")' 2>&1 | tail -1)"
timeout 150 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_distributed.py tests/test_auction.py tests/test_profile.py tests/test_cli_edges.py \
  -k "nccl or cuda" > "$work/gpu-tests.txt" 2>&1; say "gpu tests: exit $? ($(tail -1 "$work/gpu-tests.txt"))"
for spec in tiny-dropless tiny-topk; do
  timeout 60 "$py" -m moespec profile "specs/$spec.yaml" --device cuda --steps 10 --warmup 2 --trace-steps 1 --json --out "$work/prof-$spec" \
    > "$work/profile-$spec.json" 2> "$work/profile-$spec.err"; say "profile $spec cuda: exit $?"
done
timeout 60 "$py" bench/base_solver.py --device cuda --tokens 4096 --experts 256 --repeats 3 > "$work/auction-cuda.txt" 2>&1
say "auction cuda against scipy: exit $? ($(grep -E 'ours|gap' "$work/auction-cuda.txt" | tr -s ' ' | paste -sd ';'))"
timeout 60 "$py" bench/base_solver.py --device cuda --filler --experts 160 --repeats 3 >> "$work/auction-cuda.txt" 2>&1
say "auction cuda, filler rows: exit $?"; grep "filler rows" "$work/auction-cuda.txt" | tee -a "$out/summary.txt"
backend="${BACKEND:-h200-cluster-4n}"
timeout 120 "$py" -m moespec calibrate --backend "$backend" --device cuda --nproc 1 --json > "$work/calibration.json" 2> "$work/calibrate.err"
say "calibrate: exit $?"
cp profiler/calibrations/"$backend".nproc1.json "$out/" 2>/dev/null
timeout 140 "$py" bench/accuracy.py --suite heldout --calibration auto --device cuda --backend "$backend" > "$work/heldout.txt" 2>&1
say "held-out accuracy: exit $?"
tail -4 "$work/heldout.txt" | tee -a "$out/summary.txt"
timeout 60 "$py" -m moespec train specs/tiny-topk.yaml --device cuda --steps 20 --save "$work/ckpt" --save-every 10 --json \
  > "$work/train-cuda.json" 2> "$work/train-cuda.err"; say "train cuda: exit $?"
timeout 45 "$py" -m moespec train specs/tiny-topk.yaml --device cuda --steps 20 --resume "$work/ckpt/step-00000010" --json \
  > "$work/resume-cuda.json" 2> "$work/resume-cuda.err"; say "resume cuda: exit $?"
"$py" -c "import json,sys; L=lambda f:[r['loss'] for r in json.load(open(f))['records']]; a=L(sys.argv[1])[10:]; b=L(sys.argv[2]); print('cuda resume losses equal:', a == b, a[-1:], b[-1:])" \
  "$work/train-cuda.json" "$work/resume-cuda.json" 2>&1 | tee -a "$out/summary.txt"
rm -rf "$work/ckpt" "$work"/prof-*/*.pt.trace.json
tar czf "$out/gpu-check.tgz" -C "$work" . && say "packed: gpu-check.tgz"
