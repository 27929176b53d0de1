"""Generation speed and memory: the teacher and its hybrids side by side, in one run, with ratios.

    python -m distill.eval.speed                 # SmolLM2 teacher vs 50%/25%/0%-attention hybrids
    python -m distill.eval.speed --quick         # a minute: shorter contexts, fewer steps

For every (batch, context) all models are measured back to back. With `--threads 1` on CPU the clock is
the thread's CPU time, so other processes on a shared machine do not inflate the numbers (see `clock`).

- prefill tokens/s: one forward over `batch x context` random tokens (skipped above `--prefill-max-tokens`).
- decode tokens/s: greedy steps of one token per sequence on top of a cache holding `context` tokens (median
  step time). The cache comes from a short real prefill (which gives its structure: KV for attention layers,
  conv + SSM state for Mamba layers) whose attention KV is then grown to `context` random entries. Decode
  time depends on the cache's shapes, not its values, so this measures decoding at 8k x 8 without minutes
  of prefill. The teacher and the hybrids' attention layers use transformers' stock `DynamicCache`.
- memory: the KV cache bytes vs the SSM state bytes, and the peak memory above the loaded weights while the
  cache exists and decoding runs (process RSS on CPU, the allocator's peak on CUDA).

Decode speed does not depend on trained weights: the hybrids are freshly initialised from the teacher.
`--checkpoints DIR ...` adds checkpoint folders (a run's final/, or an export such as our stock Bamba one, which
runs our CPU kernels through transformers' kernel hook as in `distill eval`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

PROMPT = 8  # real prefill that gives the cache its structure
WARMUP_STEPS = 1


# ----------------------------------------------------------------------------- cache and memory


def cache_bytes(cache) -> dict:
    """Bytes held by attention KV (grows with context) and by Mamba conv + SSM states (fixed)."""
    kv = ssm = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                kv += tensor.nbytes
        for name in ("conv_states", "recurrent_states"):
            ssm += sum(
                t.nbytes for t in (getattr(layer, name, None) or {}).values() if isinstance(t, torch.Tensor)
            )
    return {"kv_cache_bytes": kv, "ssm_state_bytes": ssm}


def build_cache(model, batch: int, context: int):
    """A cache that holds `context` tokens per sequence (see the module docstring for why KV is grown)."""
    device = next(model.parameters()).device
    ids = torch.randint(model.config.vocab_size, (batch, min(PROMPT, context)), device=device)
    cache = model(input_ids=ids, use_cache=True).cache
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.numel() > 0:
            window = getattr(layer, "sliding_window", None)  # a sliding layer keeps its last window - 1 tokens
            shape = (*keys.shape[:2], context if window is None else min(context, window - 1), keys.shape[-1])
            layer.keys = torch.randn(shape, dtype=keys.dtype, device=device)
            layer.values = torch.randn(shape, dtype=keys.dtype, device=device)
            if window is not None:
                layer.cumulative_length = context
    return cache


def _return_freed_memory_to_the_os() -> None:
    """Serve every block >= 1 MiB by mmap, so freeing a tensor lowers the RSS and the next peak is measured
    from a true baseline (glibc otherwise raises this threshold after frees and keeps memory in its heap)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the RSS peak may then undercount re-used memory
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)  # free heap pages freed before the threshold was set go back to the OS too


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0), so VmHWM measures from now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "bytes" is, on exit, the peak memory above the level at entry.

    On CPU this is the kernel's exact RSS high-water mark (no sampling, so short-lived peaks count too)."""
    result = {"bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        result["bytes"] = torch.cuda.max_memory_allocated(device) - start
        return
    _return_freed_memory_to_the_os()
    _reset_peak_rss()
    start = _rss_bytes()
    yield result
    result["bytes"] = _peak_rss_bytes() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device):
    """Thread CPU time on a single-threaded CPU run (all work happens in this thread, and time spent preempted
    by other processes on a shared machine does not count); wall time otherwise."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


# ----------------------------------------------------------------------------- measurements


@torch.no_grad()
def measure_prefill(model, batch: int, context: int) -> float:
    """Tokens per second of one forward over `batch x context` tokens (after a small warm-up)."""
    device = next(model.parameters()).device
    now = clock(device)
    model(input_ids=torch.randint(model.config.vocab_size, (batch, min(64, context)), device=device))
    ids = torch.randint(model.config.vocab_size, (batch, context), device=device)
    _sync(device)
    start = now()
    model(input_ids=ids, use_cache=True)
    _sync(device)
    return batch * context / (now() - start)


@torch.no_grad()
def measure_decode(model, batch: int, context: int, steps: int) -> dict:
    """Greedy decode `steps` tokens per sequence after `context` cached tokens: speed, state, peak memory.

    The step time is the median over the timed steps, so a step preempted by another process does not count.
    """
    device = next(model.parameters()).device
    now, times = clock(device), []
    with peak_memory(device) as peak:
        cache = build_cache(model, batch, context)
        sizes = cache_bytes(cache)
        token = torch.randint(model.config.vocab_size, (batch, 1), device=device)
        for step in range(WARMUP_STEPS + steps):
            position = torch.full((batch, 1), context + step, device=device)
            start = now()
            logits = model(input_ids=token, position_ids=position, cache=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            _sync(device)
            times.append(now() - start)
    step_time = statistics.median(times[WARMUP_STEPS:])
    return {
        "decode_tok_s": batch / step_time,
        "decode_ms_per_step": 1000 * step_time,
        "peak_memory_bytes": peak["bytes"],
        **sizes,
    }


def benchmark(
    models: dict,
    contexts: list[int],
    batch_sizes: list[int],
    steps: int,
    prefill_max_tokens: int,
    max_batch_tokens: int = 8 * 8192,
    log=print,
) -> list[dict]:
    """One row per (model, batch, context); the first model is the baseline for the ratios.

    (batch, context) pairs above `max_batch_tokens` cached tokens are skipped (16k runs at batch 1 only)."""
    baseline = next(iter(models))
    rows = []
    for batch in batch_sizes:
        for context in contexts:
            if batch * context > max_batch_tokens:
                continue
            group = []
            for name, model in models.items():
                row = {"model": name, "batch": batch, "context": context}
                row["prefill_tok_s"] = (
                    measure_prefill(model, batch, context) if batch * context <= prefill_max_tokens else None
                )
                row.update(measure_decode(model, batch, context, steps))
                group.append(row)
                log(format_row(row))
            base = group[0]
            for row in group:
                row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
                row["baseline"] = baseline
            rows.extend(group)
    return rows


# ----------------------------------------------------------------------------- output


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def format_row(row: dict) -> str:
    prefill = f"{row['prefill_tok_s']:.0f}" if row.get("prefill_tok_s") else "-"
    return (
        f"{row['model']:<10} b={row['batch']:<2} ctx={row['context']:<6} prefill {prefill:>6} tok/s  "
        f"decode {row['decode_tok_s']:8.1f} tok/s ({row['decode_ms_per_step']:7.1f} ms/step)  "
        f"KV {_mib(row['kv_cache_bytes'])} MiB  SSM {_mib(row['ssm_state_bytes'])} MiB  "
        f"peak {_mib(row['peak_memory_bytes'])} MiB"
    )


def markdown(rows: list[dict]) -> str:
    """The side-by-side table: one line per (batch, context, model) with the decode ratio to the baseline."""
    lines = [
        (
            "| batch | context | model | prefill tok/s | decode tok/s | ms/token step | decode speedup | "
            "KV cache MiB | SSM state MiB | peak MiB |"
        ),
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        prefill = f"{row['prefill_tok_s']:.0f}" if row.get("prefill_tok_s") else "-"
        lines.append(
            f"| {row['batch']} | {row['context']} | {row['model']} | {prefill} | {row['decode_tok_s']:.1f} | "
            f"{row['decode_ms_per_step']:.1f} | {row['decode_speedup']:.2f}x | "
            f"{_mib(row['kv_cache_bytes'])} | "
            f"{_mib(row['ssm_state_bytes'])} | {_mib(row['peak_memory_bytes'])} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def hybrids_of(teacher, fractions: list[float], d_states: list[int] = (), seed: int = 0) -> dict:
    """The teacher plus one freshly initialised hybrid per attention fraction (speed needs no training), and
    one per fraction and Mamba-2 state width in `d_states` (`hybrid0-state128`)."""
    from distill.init import hybrid_from_teacher
    from distill.recipe import StudentConfig

    models = {"teacher": teacher}
    for fraction in fractions:
        for d_state in [None, *d_states]:
            # speed does not depend on the weights: no calibration rows needed
            cfg = StudentConfig(attention_layers="uniform", attention_fraction=fraction, norm_init="ones",
                                mamba2_d_state=d_state)
            student = hybrid_from_teacher(teacher, cfg, seed=seed)
            name = f"hybrid{round(100 * fraction)}" + (f"-state{d_state}" if d_state else "")
            models[name] = student.to(teacher.dtype).eval()
    return models


def load_with_our_kernels(folder: Path, device: str):
    """A checkpoint folder to measure; stock transformers Mamba-family models get our CPU kernels."""
    from transformers import AutoModelForCausalLM

    import distill.modeling_hybrid  # noqa: F401  (registers the native hybrid with the Auto classes)
    from distill.kernels.transformers_hook import use_in_transformers

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True)
    return use_in_transformers(model.to(device).eval())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Decode/prefill speed and memory: teacher vs hybrids.")
    parser.add_argument(
        "--teacher", default="smollm2-135m-instruct", help="teacher.source (builtin, folder, hub id)"
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25, 0.0])
    parser.add_argument("--d-states", type=int, nargs="*", default=[],
                        help="Mamba-2 state widths to add per fraction (student.mamba2_d_state; head_dim is always in)")
    parser.add_argument(
        "--checkpoints", type=Path, nargs="*", default=[], help="checkpoint folders to add (e.g. a Bamba export)"
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=6, help="timed decode steps per measurement (median)")
    parser.add_argument(
        "--prefill-max-tokens", type=int, default=2048, help="skip prefill above batch x context"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=8 * 8192, help="skip batch x context above this"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--quick", action="store_true", help="contexts 256/1024, 4 steps, prefill <= 1024 tokens"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/speed"))
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.steps, args.prefill_max_tokens = [256, 1024], 4, 1024

    from distill.recipe import TeacherConfig
    from distill.teacher import load_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, _ = load_teacher(TeacherConfig(source=args.teacher), dtype=torch.float32)
    models = hybrids_of(teacher.to(args.device), args.fractions, args.d_states)
    models.update({folder.name: load_with_our_kernels(folder, args.device) for folder in args.checkpoints})
    timer = "thread CPU time" if clock(torch.device(args.device)) is time.thread_time else "wall time"
    note = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.device}, timed by {timer}."
    print(note)
    rows = benchmark(
        models, args.contexts, args.batch_sizes, args.steps, args.prefill_max_tokens, args.max_batch_tokens
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(rows, indent=2))
    (args.out / "speed.md").write_text(f"{note}\n\n{markdown(rows)}\n")
    from distill.eval.report import plot_speed

    plots = plot_speed(rows, args.out)
    print(markdown(rows))
    print(f"wrote {args.out / 'speed.json'}, {args.out / 'speed.md'}, " + ", ".join(str(p) for p in plots))


if __name__ == "__main__":
    main()
