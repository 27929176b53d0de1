#!/usr/bin/env bash
# Refresh requirements-lock.txt: a new virtual environment, the newest releases pyproject.toml allows, the whole
# test suite, and only if it passes, the lock rewritten from what was installed (torch without its +cpu label).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d -t mamba-distill-lock.XXXXXX)
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
MAMBA_DISTILL_LATEST=1 bash scripts/test.sh "$@"
{
  echo "# The exact versions the whole test suite last passed with (scripts/lock.sh wrote this; Python $(python -c 'import platform; print(platform.python_version())'))."
  echo "# scripts/setup.sh installs with it as pip constraints; scripts/setup.sh --latest ignores it."
  # torch without its local label (+cpu / +cu128 builds of one version all match); no triton line, because a CUDA
  # torch pins its own triton and the CPU tests take any (it only runs in its interpreter there)
  python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' | grep -v '^triton=='
} > requirements-lock.txt.tmp
mv requirements-lock.txt.tmp requirements-lock.txt
rm -rf "$work"
echo "requirements-lock.txt refreshed; review with: git diff requirements-lock.txt"
