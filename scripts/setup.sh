#!/usr/bin/env bash
# Install mamba-distill into the current Python environment and fetch the built-in teacher and data.
#
#   bash scripts/setup.sh            # the exact versions of requirements-lock.txt (what the test suite last passed with)
#   bash scripts/setup.sh --latest   # no lock: the newest releases pyproject.toml allows (also MAMBA_DISTILL_LATEST=1)
#   bash scripts/setup.sh --no-dev   # what a run needs, without the test tools and llama.cpp (scripts/demo.sh)
#
# torch comes first, and only if it is missing. Without a GPU it is a CPU build: the lock's version with the
# `+cpu` label (from the PyTorch CPU index when reachable, else from wherever pip finds it), so pip fails rather
# than pull PyPI's multi-GB CUDA build; `--latest` takes the CPU index's newest when that index is reachable.
# With nvidia-smi it is PyPI's CUDA build. Override either with e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
# The lock pins torch without a local label, so it accepts the CPU and the CUDA builds of that version.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CPU_INDEX=https://download.pytorch.org/whl/cpu
LOCK=requirements-lock.txt

latest=${MAMBA_DISTILL_LATEST:-0}
extras=dev,eval
for arg in "$@"; do
  case $arg in
    --latest) latest=1 ;;
    --no-dev) extras=eval ;;
    *) echo "error: unknown option '$arg'; use: bash scripts/setup.sh [--latest] [--no-dev]" >&2; exit 2 ;;
  esac
done
constraints=(-c "$LOCK")
[ "$latest" = 1 ] && constraints=()
torch_version=$(sed -n 's/^torch==//p' "$LOCK")

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  cpu_index_reachable() { "$PYTHON" -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/', timeout=10)" 2>/dev/null; }
  if [ -n "${TORCH_SPEC:-}" ]; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
    "$PYTHON" -m pip install $TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install "torch==$torch_version"
  elif cpu_index_reachable; then
    if [ "$latest" = 1 ]; then spec=torch; else spec="torch==$torch_version+cpu"; fi
    "$PYTHON" -m pip install "$spec" --index-url "$CPU_INDEX"
  else
    "$PYTHON" -m pip install "torch==$torch_version+cpu"
  fi
fi
"$PYTHON" -m pip install -e ".[$extras]" "${constraints[@]}"
"$PYTHON" -m distill fetch-assets
if [ "$extras" = dev,eval ]; then
  bash scripts/setup_llama_cpp.sh   # a real llama.cpp for the GGUF tests (skips itself without npm)
fi
