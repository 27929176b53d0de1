#!/usr/bin/env bash
# Set up, then distil SmolLM2-135M-Instruct into a 50% attention / 50% Mamba-2 hybrid on ShareGPT.
# Extra arguments go to the run, e.g.: bash scripts/demo.sh --set stages.1.max_tokens=1e5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
accelerate launch --config_file recipes/accelerate/cpu.yaml distill/run.py \
  recipes/smollm2-135m/hybrid50-mamba2.yaml "$@"
