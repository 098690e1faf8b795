#!/usr/bin/env bash
# The prepared GPU check (at most 10 minutes on one GPU): the paper preset (bundle/configs/paper.json) trained for a
# few hundred iterations on the embedded demo data, then inference on a 240x240x155 brain; prints slices/s for
# training and inference, seconds per volume and peak GPU memory (JSON, also in runs/gpu_check/gpu_check.json).
# Installs nothing: run it after the README's setup with a CUDA build of torch, from anywhere in the repository.
#   bash bench/gpu_check.sh [ITERATIONS]        (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch: this check needs one')"
export PYTHONUNBUFFERED=1
timeout 570 "$PY" bench/gpu_check.py --iterations "${1:-300}" --out runs/gpu_check
