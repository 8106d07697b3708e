#!/usr/bin/env bash
# The prepared one-GPU check (benchmarks/gpu_check.py --help for its cases), in one call under 8 minutes:
# where pydantic or diffusers is missing, installs the wheels of .whl/ (benchmarks/gpu_wheels.sh: for a
# machine that cannot download) into /tmp/site; prints the GPU, then runs every case; results.jsonl and
# the log land in $OUT when set, else in runs/gpu_check/<date>.
# Usage: bash benchmarks/gpu_check.sh [--cases a,e,f] [--budget-s S] [--peak-tflops T] ...
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if ! "$python" -c 'import pydantic, diffusers' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: not available"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 480 "$python" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
