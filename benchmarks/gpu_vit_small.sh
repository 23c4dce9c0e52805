#!/usr/bin/env bash
# DINO-MC ViT-S/16 and ViT-S/8 training step on one GPU at bf16: images/s, peak GPU memory, model FLOP utilisation.
#
#   bash benchmarks/gpu_vit_small.sh [OUTPUT.jsonl]      (default: benchmarks/results_gpu_train_step.jsonl)
#
# One JSON line per run from train_step.py (gpu name, step_ms_median, imgs_per_s, peak_gpu_mem_mb,
# gflop_per_step, achieved_tflops, peak_tflops, mfu), appended to OUTPUT. BATCH (default 64 images per GPU),
# STEPS (20) and WARMUP (5) may be set in the environment; PEAK_TFLOPS for a card missing from train_step.py's
# data-sheet table.
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:-benchmarks/results_gpu_train_step.jsonl}"
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
extra=()
[ -n "${PEAK_TFLOPS:-}" ] && extra+=(--peak_tflops "$PEAK_TFLOPS")
for patch in 16 8; do
  "$python" benchmarks/train_step.py --device cuda --precision bf16 --arch vit_small --patch_size "$patch" \
    --data_mode mc --batch_size_per_gpu "${BATCH:-64}" --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" \
    "${extra[@]}" | tee -a "$output"
done
