#!/usr/bin/env bash
# GPU checks for a device machine (one prepared script: calibrate, then judge on held-out specs).
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. the NCCL and CUDA tests that skip without a GPU;
# 2. `moespec calibrate --device cuda` for the BACKEND (default h200-cluster-4n: the device
#    machine's H200; writes profiler/calibrations/<backend>.nproc1.json);
# 3. the held-out accuracy suite (bench/accuracy.py --suite heldout) against that calibration;
# 4. `train --device cuda` (NCCL, bf16 autocast per the spec): 20 steps with a checkpoint at
#    10, then a resume from it whose losses must equal the uninterrupted run's steps 11-20.
# Each step has its own time limit so the whole script stays under 9 minutes; outputs go to
# OUT_DIR (default $OUT, the device tool's folder that comes back, else ./gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
py=.venv/bin/python
[ -x "$py" ] || py=python3
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || { echo "no GPU here (nvidia-smi failed)"; exit 2; }
timeout 180 "$py" -m pytest -q -rs tests/test_distributed.py tests/test_auction.py tests/test_profile.py -k "nccl or cuda" \
  > "$out/gpu-tests.txt" 2>&1; echo "gpu tests: exit $?" | tee -a "$out/summary.txt"
backend="${BACKEND:-h200-cluster-4n}"
timeout 150 "$py" -m moespec calibrate --backend "$backend" --device cuda --nproc 1 --json > "$out/calibration.json" 2> "$out/calibrate.err"
echo "calibrate: exit $?" | tee -a "$out/summary.txt"
timeout 150 "$py" bench/accuracy.py --suite heldout --calibration auto --device cuda --backend "$backend" > "$out/heldout.txt" 2>&1
echo "held-out accuracy: exit $?" | tee -a "$out/summary.txt"
tail -4 "$out/heldout.txt" | tee -a "$out/summary.txt"
timeout 90 "$py" -m moespec train specs/tiny-topk.yaml --device cuda --steps 20 --save "$out/ckpt" --save-every 10 --json \
  > "$out/train-cuda.json" 2> "$out/train-cuda.err"; echo "train cuda: exit $?" | tee -a "$out/summary.txt"
timeout 60 "$py" -m moespec train specs/tiny-topk.yaml --device cuda --steps 20 --resume "$out/ckpt/step-00000010" --json \
  > "$out/resume-cuda.json" 2> "$out/resume-cuda.err"; echo "resume cuda: exit $?" | tee -a "$out/summary.txt"
"$py" -c "import json,sys; L=lambda f:[r['loss'] for r in json.load(open(f))['records']]; a=L(sys.argv[1])[10:]; b=L(sys.argv[2]); print('cuda resume losses equal:', a == b, a[-1:], b[-1:])" \
  "$out/train-cuda.json" "$out/resume-cuda.json" 2>&1 | tee -a "$out/summary.txt"
