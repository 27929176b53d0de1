#!/usr/bin/env bash
# Install a real llama.cpp for the GGUF tests and benchmark: node-llama-cpp's prebuilt x86-64 CPU binaries
# (libllama and friends, no compiler needed), pinned, into $MAMBA_DISTILL_CACHE/llama.cpp.
#
#   bash scripts/setup_llama_cpp.sh
#
# Idempotent (does nothing when that version is there). Without node/npm or without a reachable npm registry
# it says so and exits 0: the GGUF export works without it; only the tests that run llama.cpp skip.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^NODE_LLAMA_CPP_VERSION = "\(.*\)"/\1/p' distill/llama_cpp.py)
DEST="${MAMBA_DISTILL_CACHE:-$HOME/.cache/mamba-distill}/llama.cpp"

installed=$(node -p "require('$DEST/node_modules/node-llama-cpp/package.json').version" 2>/dev/null || true)
if [ "$installed" = "$VERSION" ]; then
  echo "llama.cpp: node-llama-cpp $VERSION is installed in $DEST"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "llama.cpp: skipped (npm not found; install Node.js >= 20 to run GGUF exports in llama.cpp)" >&2
  exit 0
fi
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) platform=linux-x64 ;;
  Linux-aarch64) platform=linux-arm64 ;;
  Darwin-arm64) platform=mac-arm64-metal ;;
  Darwin-x86_64) platform=mac-x64 ;;
  *) echo "llama.cpp: skipped (no prebuilt node-llama-cpp binaries for $(uname -s) $(uname -m))" >&2; exit 0 ;;
esac
mkdir -p "$DEST"
[ -f "$DEST/package.json" ] || echo '{"name": "mamba-distill-llama-cpp", "private": true}' > "$DEST/package.json"
# Only this platform's build (the optional CUDA/Vulkan ones are ~600 MB); --ignore-scripts: the prebuilt binaries need
# no postinstall step.
if ! npm install --prefix "$DEST" --save-exact --no-audit --no-fund --omit=optional --ignore-scripts \
    "node-llama-cpp@$VERSION" "@node-llama-cpp/$platform@$VERSION" >"$DEST/npm.log" 2>&1; then
  echo "llama.cpp: skipped (npm install failed, see $DEST/npm.log; is the npm registry reachable?)" >&2
  exit 0
fi
echo "llama.cpp: installed node-llama-cpp $VERSION in $DEST"
