#!/usr/bin/env bash
# Install mamba-distill into the current Python environment and fetch the built-in teacher and data.
#
# torch comes first and only if missing: a CPU-only machine gets the CPU wheel (never the multi-GB CUDA
# build that PyPI serves for Linux); a machine with nvidia-smi gets PyPI's CUDA build. Override with e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
    "$PYTHON" -m pip install $TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install "torch==2.13.0"
  else
    "$PYTHON" -m pip install "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PYTHON" -m pip install -e ".[dev,eval]"
"$PYTHON" -m distill fetch-assets
