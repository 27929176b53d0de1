"""A real llama.cpp to run GGUF exports in: node-llama-cpp's prebuilt CPU binaries, pinned, from npm.

`scripts/setup_llama_cpp.sh` (which `scripts/setup.sh` calls) installs `node-llama-cpp@NODE_LLAMA_CPP_VERSION`
into `$MAMBA_DISTILL_CACHE/llama.cpp`; its `libllama` runs `granitehybrid` and `llama` GGUFs on x86-64 CPUs
without compiling anything. `run(model, jobs)` drives it through `distill/llama_cpp.mjs` (one node process
per call; the model is loaded once per call): tokenize, next-token distributions at every position, greedy
continuations and prefill/decode timings, plus the process's peak memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

NODE_LLAMA_CPP_VERSION = "3.21.1"
RUNNER = Path(__file__).with_name("llama_cpp.mjs")


def install_dir() -> Path:
    from distill.assets import cache_root

    return cache_root() / "llama.cpp"


def _entry() -> Path:
    return install_dir() / "node_modules" / "node-llama-cpp" / "dist" / "index.js"


def unavailable() -> str | None:
    """Why llama.cpp cannot run here (None when it can); the reason names the fix."""
    if shutil.which("node") is None:
        return "node is not installed (llama.cpp runs through node-llama-cpp); install Node.js >= 20"
    if not _entry().is_file():
        return f"node-llama-cpp is not installed in {install_dir()}; run: bash scripts/setup_llama_cpp.sh"
    return None


def run(
    model: str | Path,
    jobs: list[dict],
    *,
    threads: int = 1,
    context: int = 512,
    kv_type: str = "F16",
    flash_attention: bool = False,
    timeout: float = 1800,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> dict:
    """Run `jobs` (see distill/llama_cpp.mjs) on the GGUF `model` in one llama.cpp process; return its answer.

    `kv_type` is the attention cache's type: llama.cpp's default F16, or F32 to compare an f32 export exactly.
    `prefix` runs node under another command (a profiler); `env` adds to its environment.
    """
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    request = {
        "model": str(Path(model).resolve()),
        "threads": threads,
        "context": context,
        "kv_type": kv_type,
        "flash_attention": flash_attention,
        "jobs": jobs,
    }
    env = dict(os.environ, **(env or {}), NODE_LLAMA_CPP_ENTRY=_entry().as_uri())
    done = subprocess.run(
        [*prefix, "node", str(RUNNER)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"llama.cpp failed on {model} (status {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return json.loads(done.stdout)
