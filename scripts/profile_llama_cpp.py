"""Where one decoded token's time goes in llama.cpp: the teacher against a hybrid, per ggml function.

    python scripts/profile_llama_cpp.py [--context 8192] [--decode 48] [--models teacher "hybrid 50%"]

Writes the models of scripts/bench_llama_cpp.py (q8_0, untrained: speed does not depend on the weights'
values), prefills `--context` tokens, and samples only the decoding that follows with Linux `perf` (cpu-clock,
started and stopped by the runner through perf's control FIFO). Prints each model's decode ms/token split by
ggml function, grouped into: the weight matrices (q8_0 dot products and the activations' 8-bit quantization),
attention over the cache (f16 dot products, softmax), the Mamba-2 scan and conv, and the rest.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench_llama_cpp import MODELS, write_models

from distill import llama_cpp

# ggml function name patterns -> what the decode step spends there (first match wins)
GROUPS = [
    ("weights (q8_0 matmul)", r"q8_0|quantize_row|gemv|gemm|repack"),
    ("attention (f16 KQ/KQV, softmax)", r"vec_dot_f16|soft_max|fp16|fp32_to_fp16|kq_mask|set_input"),
    ("Mamba-2 scan + conv", r"ssm_"),
    ("threads: barrier / spin", r"barrier|spin|sched_yield|graph_compute_thread"),
]


def group(symbol: str) -> str:
    for name, pattern in GROUPS:
        if re.search(pattern, symbol):
            return name
    return "other"


def profile(path: Path, context: int, decode: int, threads: int, folder: Path) -> tuple[float, dict]:
    """(decode ms/token, {symbol: share of decode samples}) for the GGUF `path`."""
    fifo, data = folder / "perf.ctl", folder / f"{path.stem}.perf"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    record = ("perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-D", "-1")
    prefix = (*record, "--control", f"fifo:{fifo}")
    answer = llama_cpp.run(
        path,
        [{"kind": "speed", "prompt_tokens": context, "decode_tokens": decode}],
        threads=threads,
        context=context + decode + 8,
        prefix=(*prefix, "-o", str(data), "--"),
        env={"PERF_CTL_FIFO": str(fifo)},
    )
    ms_per_token = 1000 * answer["answers"][0]["decode_s"] / decode
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "symbol", "-q"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: dict[str, float] = {}
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+\[[.k]\]\s+(.+)", line)
        if match:
            symbol = re.split(r"\s{2,}", match.group(2).strip())[0]  # perf pads with blank columns
            shares[symbol] = shares.get(symbol, 0.0) + float(match.group(1)) / 100
    return ms_per_token, shares


def report(paths: dict[str, Path], context: int, decode: int, threads: int, folder: Path, top: int) -> None:
    """Print each model's decode ms/token at `context`, by group and by its `top` functions."""
    for name, path in paths.items():
        ms, shares = profile(path, context, decode, threads, folder)
        groups: dict[str, float] = {}
        for symbol, share in shares.items():
            groups[group(symbol)] = groups.get(group(symbol), 0.0) + share
        print(f"\n{name}: {ms:.1f} ms per decoded token at {context:,} tokens of context (perf)", flush=True)
        for label, share in sorted(groups.items(), key=lambda item: -item[1]):
            print(f"  {label:<34} {share * ms:6.1f} ms  ({share:.0%})")
        for symbol, share in sorted(shares.items(), key=lambda item: -item[1])[:top]:
            print(f"    {share * ms:6.2f} ms  {share:5.1%}  {symbol}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--decode", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["teacher", "hybrid 50%"], choices=list(MODELS))
    parser.add_argument("--top", type=int, default=12, help="functions listed per model")
    args = parser.parse_args()
    reason = llama_cpp.unavailable() or (None if shutil.which("perf") else "perf is not installed")
    if reason is not None:
        raise SystemExit(f"error: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_models(Path(tmp), "q8_0", names=args.models)
        report(paths, args.context, args.decode, args.threads, Path(tmp), args.top)


if __name__ == "__main__":
    main()
