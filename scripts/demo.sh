#!/usr/bin/env bash
# Set up, then distil SmolLM2-135M-Instruct into a 50% attention / 50% Mamba-2 hybrid on ShareGPT.
# Extra arguments go to the run, e.g.: bash scripts/demo.sh --set stages.1.max_tokens=1e5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-dev   # the run needs neither the test tools nor llama.cpp
# accelerate would otherwise pick the same thread count and print a notice about it.
threads=$("${PYTHON:-python}" -c "import psutil; print(psutil.cpu_count(logical=False) or 1)")
accelerate launch --config_file recipes/accelerate/cpu.yaml --num_cpu_threads_per_process "$threads" distill/run.py \
  recipes/smollm2-135m/hybrid50-mamba2.yaml "$@"
