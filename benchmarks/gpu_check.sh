#!/usr/bin/env bash
# One-GPU training throughput and MFU of xut-base at 256 px (benchmarks/gpu_check.py --help for the setup).
# Usage: bash benchmarks/gpu_check.sh [--batch-size N] [--peak-tflops T] ...   (under 5 minutes on one GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
exec timeout 300 "$python" benchmarks/gpu_check.py "$@"
