#!/usr/bin/env bash
# One-shot check of a GPU machine (benchmarks/gpu_check.py): CUDA against the CPU, bf16 / fp16, kill and resume,
# step speed, the loader, torchrun. JSON lines on stdout and in gpu_check.jsonl (--output FILE).
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine; send back gpu_check.jsonl
#   bash benchmarks/gpu_check.sh --device cpu --quick   # the script's plumbing, on any machine
#
# Exit code 0 when every result is ok, 1 otherwise; PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
exec "$python" benchmarks/gpu_check.py "$@"
