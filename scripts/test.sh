#!/usr/bin/env bash
# Set up, then run every test, including the slow ones on the real SmolLM2 teacher and ShareGPT data.
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -m "not slow"
# MAMBA_DISTILL_LATEST=1 sets up without the lock (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python}" -m pytest -q "$@"
