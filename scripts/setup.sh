#!/usr/bin/env bash
# Install mamba-distill into the current Python environment and fetch the built-in teacher and data.
#
# torch is installed first and only if missing. Without a GPU it is the CPU build `torch==2.13.0+cpu`
# (from the PyTorch CPU index when reachable, else from wherever pip finds it); the spec pins the local
# `+cpu` label, so pip fails rather than pull PyPI's multi-GB CUDA build. With nvidia-smi it is PyPI's
# CUDA build. Override either with e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CPU_INDEX=https://download.pytorch.org/whl/cpu

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
    "$PYTHON" -m pip install $TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install "torch==2.13.0"
  elif "$PYTHON" -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/', timeout=10)" 2>/dev/null; then
    "$PYTHON" -m pip install "torch==2.13.0+cpu" --extra-index-url "$CPU_INDEX"
  else
    "$PYTHON" -m pip install "torch==2.13.0+cpu"
  fi
fi
"$PYTHON" -m pip install -e ".[dev,eval]"
"$PYTHON" -m distill fetch-assets
