#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine that has torch and transformers but cannot download:
# what gpu_check imports and that machine's image lacks (pydantic for the stage config, diffusers for the
# precompute case's VAE, and their requirements not already there), for CPython 3.12 on manylinux x86-64,
# pinned to the versions of this checkout's .venv. Run here (with the package index reachable); the wheels
# land in .whl/ (git-ignored), which gpu_check.sh installs into /tmp/site before it runs.
# Usage: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv_pip=${PIP:-.venv/bin/pip}
# typing-extensions: pydantic needs 4.16 or later; importlib-metadata, a diffusers requirement the image lacks,
# is imported by diffusers only on Python < 3.8
packages=(pydantic pydantic-core annotated-types typing-inspection typing-extensions diffusers)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
rm -rf .whl && mkdir -p .whl
for name in "${packages[@]}"; do
  version=$("$venv_pip" show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in the .venv" >&2; exit 1; }
  "$venv_pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$name==$version"
done
ls -l .whl
du -sh .whl
