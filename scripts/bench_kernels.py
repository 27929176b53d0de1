"""Benchmark the scan kernels side by side, in one run, and print markdown tables with ratios.

Mamba-2 (SSD) scan: our public `mamba_chunk_scan_combined` (torch backend: the chunked PyTorch path, at its own
block size whatever chunk size it is given) vs transformers' own pure-torch fallback
(`transformers.models.mamba2.modeling_mamba2.mamba2_chunk_scan`, what its Mamba-2 family runs without mamba-ssm)
vs the sequential reference loop. Both are called with each chunk size of --chunks (a model's `chunk_size`; 256
is Mamba2Config's and BambaConfig's default), and each row's ratios are against ours at the same chunk size; after
each case a "best" line compares each implementation at its fastest of those chunk sizes. Mamba-1 selective scan: our PyTorch path vs mambapy's parallel scan
(`mambapy.mamba.MambaBlock.selective_scan`) vs the loop.

For each row: time (the best of at least --reps calls and at least one second of calls), effective GFLOP/s, the
ratio to the matmul-bound floor, the peak memory the call adds on top of its inputs, and time / memory ratios
against ours. GFLOP/s use one FLOP count per problem for every variant (so they compare like speeds): for SSD the
matmul work of the chunked algorithm at our block size Q = DEFAULT_CHUNK_SIZE, 2 b L (Q g n + Q h p + 2 h p n) forward and 3x that
forward+backward; the floor is that count at this machine's fp32 matmul rate, measured right before and right
after each variant's timed calls, the faster of the two (this shared VM moves between a slow and a fast state,
sometimes within seconds). For the Mamba-1 scan (elementwise work, no matmuls) it is 6 b L d n per forward. "fwd"
runs under no_grad; "fwd+bwd" backpropagates a random output gradient into every input. bf16 inputs are computed
in fp32 inside every variant.

Peak memory comes from one extra call per row, made with glibc's mmap threshold fixed at 128 KiB and the heap's
free memory returned to the OS first (malloc_trim): every larger tensor is then its own mapping, returned to the
OS when freed, so VmHWM (reset through /proc/self/clear_refs) minus the resident size before the call is the
call's peak. The timed calls run with the threshold at 32 MiB and the trim threshold at 64 MiB, where glibc's own
dynamic thresholds settle in a loop that frees and reallocates tensors (a training step): freed memory below
32 MiB is reused without page faults, larger tensors are mapped afresh each time. They run back to back, as
timeit's do (a garbage collection before each call would evict the caches, which costs a small call about as much
as its floor). Every variant runs with PyTorch's transparent huge pages for large CPU tensors
(THP_MEM_ALLOC_ENABLE=1, which importing distill sets, as it does for training).

    python scripts/bench_kernels.py            # the full table (several minutes on 2 cores)
    python scripts/bench_kernels.py --quick    # a small subset, about a minute
    python scripts/bench_kernels.py --tune     # our SSD time per block size, to pick DEFAULT_CHUNK_SIZE
    python scripts/bench_kernels.py --no-mamba1 --modes fwd+bwd --batch 2 --lengths 4096 --chunks 64 128 256
                                               # one targeted case: fwd+bwd at three chunk sizes
    python scripts/bench_kernels.py --compare-threads 1 2 --runs 5 --batch 2 --lengths 4096 --chunks 64 128 256
                                               # ours vs transformers' fallback, fwd+bwd, at 1 and 2 threads

`--compare-threads` is the side-by-side the kernels README quotes: for each dtype, chunk size and thread count,
--runs runs, each timing ours and transformers' fallback interleaved (--reps calls of each, alternating, the
median of each), so both see the same moments of a shared machine. It prints the medians over runs and each
run's ratio, and the spread: the slowest and fastest run's ratio. Wall time (two threads share it).
"""

import argparse
import ctypes
import functools
import gc
import os
import statistics
import time

import torch

from distill.eval.speed import clock as speed_clock
from distill.kernels import dispatch
from distill.kernels.selective_scan import selective_scan_torch
from distill.kernels.selective_scan_naive import selective_scan_naive
from distill.kernels.ssd_chunked import DEFAULT_CHUNK_SIZE, ssd_chunked
from distill.kernels.ssd_naive import ssd_naive

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def memory_status():
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                status[key] = int(value.split()[0]) * 1024
    return status


def clock():
    """eval/speed.py's clock: this thread's CPU time when torch runs on one thread, wall time otherwise."""
    return speed_clock(torch.device("cpu"))()


LIBC = ctypes.CDLL(None)
MIN_TIMED_SECONDS = 1.0
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def malloc_thresholds(mmap_bytes, trim_bytes):
    """Fix glibc's mmap and trim thresholds (mallopt), which also stops their dynamic adjustment."""
    if not (LIBC.mallopt(M_MMAP_THRESHOLD, mmap_bytes) and LIBC.mallopt(M_TRIM_THRESHOLD, trim_bytes)):
        raise RuntimeError("mallopt refused the malloc thresholds (is this glibc?)")


def measure(fn, reps):
    """(best seconds, peak extra bytes, matmul FLOP/s) of fn(): one call for memory, then `reps` timed calls between
    two measurements of the matmul rate (see the docstring)."""
    malloc_thresholds(128 << 10, 128 << 10)
    gc.collect()
    LIBC.malloc_trim(0)  # free heap memory left resident by earlier calls would hide part of this call's peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = memory_status()["VmRSS"]
    start = clock()
    fn()
    once = clock() - start
    peak = memory_status()["VmHWM"] - before
    malloc_thresholds(32 << 20, 64 << 20)
    rate = matmul_rate(reps=3)
    best, spent, calls = float("inf"), 0.0, 0
    # At least `reps` calls and MIN_TIMED_SECONDS of them, so a fast row's best is not from one slow moment of
    # the VM; one call for the slowest rows.
    while calls < (reps if once < 20 else 1) or spent < MIN_TIMED_SECONDS:
        start = clock()
        fn()
        elapsed = clock() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best, peak, max(rate, matmul_rate(reps=3))


def matmul_rate(size=1024, reps=5):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * size**3 / best


def _timed(fn):
    start = clock()
    fn()
    return clock() - start


def run_case(fn, inputs, backward, reps):
    """Times fn(**inputs) (forward under no_grad, or forward + backward into every floating input)."""
    leaves = {k: v for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()}

    def call():
        if not backward:
            with torch.no_grad():
                fn(**inputs)
            return
        args = {**inputs, **{k: v.detach().requires_grad_(True) for k, v in leaves.items()}}
        y = fn(**args)
        y.backward(grad)

    grad = None
    if backward:
        with torch.no_grad():
            grad = torch.randn_like(fn(**inputs))
    return measure(call, reps)


# ----------------------------------------------------------------------------- Mamba-2


def hf_mamba2_scan():
    """transformers' pure-torch Mamba-2 scan, unwrapped from its hub-kernel / mamba-ssm dispatch decorator."""
    from transformers.models.mamba2 import modeling_mamba2

    scan = modeling_mamba2.mamba2_chunk_scan
    return getattr(scan, "__wrapped__", scan)


def ssd_inputs(b, L, h, p, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(b, L, h, p, generator=gen).to(dtype),
        "dt": (torch.rand(b, L, h, generator=gen) * 4 - 6).to(dtype),  # softplus -> dt in ~[2e-3, 0.12]
        "A": -torch.linspace(1, 16, h),
        "B": torch.randn(b, L, 1, n, generator=gen).to(dtype),
        "C": torch.randn(b, L, 1, n, generator=gen).to(dtype),
        "D": torch.randn(h),
        "dt_bias": torch.randn(h, generator=gen) * 0.1,
    }


def ssd_flops(b, L, h, p, n, chunk, g=1):
    return 2 * b * L * (chunk * g * n + chunk * h * p + 2 * h * p * n)


def ours_scan(chunk, **kw):
    """Our public scan, as a model calls it, on the torch backend."""
    dispatch.set_backend("torch")
    try:
        return dispatch.mamba_chunk_scan_combined(chunk_size=chunk, dt_softplus=True, **kw)
    finally:
        dispatch.set_backend(None)


def bench_mamba2(args, rows):
    hf = hf_mamba2_scan()
    variants = {}
    for chunk in args.chunks:
        variants[f"ours (chunk {chunk})"] = functools.partial(ours_scan, chunk)
        variants[f"transformers fallback (chunk {chunk})"] = functools.partial(
            lambda chunk, **kw: hf(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), chunk,
                                   dt_softplus=True, **kw), chunk)
    variants["naive loop"] = lambda **kw: ssd_naive(dt_softplus=True, **kw)
    for n in args.dstate:
        for dtype_name in args.dtypes:
            for backward in args.modes:
                for b in args.batch:
                    for L in args.lengths:
                        inputs = ssd_inputs(b, L, args.heads, args.headdim, n, DTYPES[dtype_name])
                        flops = ssd_flops(b, L, args.heads, args.headdim, n, DEFAULT_CHUNK_SIZE) * (3 if backward else 1)
                        results = {}
                        for name, fn in variants.items():
                            if name == "naive loop" and L > args.naive_max_len:
                                continue
                            results[name] = run_case(fn, inputs, backward, args.reps)
                        add_rows(rows, "mamba2", dtype_name, backward, b, L, n, results, flops)
                        print_row_block(rows[-len(results):])
                        print(best_vs_best(results), flush=True)


def best_vs_best(results):
    """Each implementation at its fastest chunk size: the honest headline ratio."""
    best = {}
    for who in ("ours", "transformers"):
        name = min((k for k in results if k.startswith(who)), key=lambda k: results[k][0])
        best[who] = (name, results[name][0])
    (ours, t_ours), (theirs, t_theirs) = best["ours"], best["transformers"]
    return f"best: {ours} {t_ours * 1e3:.1f} ms vs {theirs} {t_theirs * 1e3:.1f} ms: {t_theirs / t_ours:.2f}x"


def timed_fwd_bwd(scan, chunk, inputs, grad):
    """Wall seconds of one forward + backward of scan into every floating input."""
    args = {k: v.detach().requires_grad_(True) if v.is_floating_point() else v for k, v in inputs.items()}
    start = time.perf_counter()
    scan(chunk, **args).backward(grad)
    return time.perf_counter() - start


def compare_row(scans, chunk, inputs, grad, runs, reps):
    """Per run, the median of `reps` interleaved calls of each scan: {name: [seconds per run]}."""
    for scan in scans.values():  # warm-up
        timed_fwd_bwd(scan, chunk, inputs, grad)
    times = {name: [] for name in scans}
    for _ in range(runs):
        calls = {name: [] for name in scans}
        for _ in range(reps):
            for name, scan in scans.items():
                calls[name].append(timed_fwd_bwd(scan, chunk, inputs, grad))
        for name, seconds in calls.items():
            times[name].append(statistics.median(seconds))
    return times


def compare_threads(args):
    """Ours vs transformers' fallback, fwd+bwd, per dtype, chunk size and thread count: medians and spread over runs
    of interleaved calls (see the docstring)."""
    hf = hf_mamba2_scan()
    scans = {"ours": ours_scan,
             "transformers": lambda chunk, **kw: hf(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"),
                                                    chunk, dt_softplus=True, **kw)}
    print("| dtype | b | L | chunk | threads | ours ms | transformers ms | ratio (median of runs) | "
          "ratio, slowest-fastest run | runs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        for b in args.batch:
            for L in args.lengths:
                inputs = ssd_inputs(b, L, args.heads, args.headdim, args.dstate[0], DTYPES[dtype_name])
                with torch.no_grad():
                    grad = torch.randn_like(ours_scan(64, **inputs))
                for chunk in args.chunks:
                    for threads in args.compare_threads:
                        torch.set_num_threads(threads)
                        times = compare_row(scans, chunk, inputs, grad, args.runs, args.reps)
                        ratios = sorted(t / o for o, t in zip(times["ours"], times["transformers"]))
                        ours, theirs = (statistics.median(times[k]) * 1e3 for k in ("ours", "transformers"))
                        print(f"| {dtype_name} | {b} | {L} | {chunk} | {threads} | {ours:.0f} | {theirs:.0f} | "
                              f"{statistics.median(ratios):.2f}x | {ratios[0]:.2f}-{ratios[-1]:.2f}x | "
                              f"{args.runs} |", flush=True)


# ----------------------------------------------------------------------------- Mamba-1


def mambapy_scan(u, delta, A, B, C, D):
    """mambapy's own selective scan (pscan), in its (b, l, d) layout."""
    from mambapy.mamba import MambaBlock

    y = MambaBlock.selective_scan(None, u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                  C.transpose(1, 2), D)
    return y.transpose(1, 2)


def bench_mamba1(args, rows):
    variants = {
        "ours": lambda **kw: selective_scan_torch(**kw),
        "mambapy pscan": lambda **kw: mambapy_scan(**kw),
        "naive loop": lambda **kw: selective_scan_naive(**kw),
    }
    d, n = args.d_inner, args.m1_dstate
    for dtype_name in args.dtypes:
        for backward in args.modes:
            for b in args.batch:
                for L in args.m1_lengths:
                    gen = torch.Generator().manual_seed(0)
                    dtype = DTYPES[dtype_name]
                    inputs = {
                        "u": torch.randn(b, d, L, generator=gen).to(dtype),
                        "delta": (torch.rand(b, d, L, generator=gen) * 0.1 + 1e-3).to(dtype),
                        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),  # S4D-real init
                        "B": torch.randn(b, n, L, generator=gen).to(dtype),
                        "C": torch.randn(b, n, L, generator=gen).to(dtype),
                        "D": torch.randn(d),
                    }
                    flops = 6 * b * L * d * n * (3 if backward else 1)
                    results = {}
                    for name, fn in variants.items():
                        if name == "naive loop" and L > args.naive_max_len:
                            continue
                        if name == "mambapy pscan" and dtype != torch.float32:
                            continue  # mambapy computes in the input dtype; a bf16 scan is not comparable
                        results[name] = run_case(fn, inputs, backward, args.reps)
                    add_rows(rows, "mamba1", dtype_name, backward, b, L, n, results, flops)
                    print_row_block(rows[-len(results):])


# ----------------------------------------------------------------------------- output


HEADER = ("| scan | dtype | mode | b | L | n | variant | ms | GFLOP/s | matmul GFLOP/s | x floor | peak MiB "
          "| time / ours | memory / ours |")


def baseline(name, results):
    """The row's "ours": ours at the same chunk size, else ours at the first one."""
    same = "ours " + name[name.index("("):] if "(chunk" in name else None
    return results[same] if same in results else next(v for k, v in results.items() if k.startswith("ours"))


def add_rows(rows, op, dtype, backward, b, L, n, results, flops):
    for name, (seconds, peak, rate) in results.items():
        ours_time, ours_mem, _ = baseline(name, results)
        rows.append(
            f"| {op} | {dtype} | {'fwd+bwd' if backward else 'fwd'} | {b} | {L} | {n} | {name} | {seconds * 1e3:.1f} "
            f"| {flops / seconds / 1e9:.1f} | {rate / 1e9:.0f} | {seconds / (flops / rate):.1f} | {peak / 2**20:.0f} "
            f"| {seconds / ours_time:.2f} | {f'{peak / ours_mem:.2f}' if ours_mem >= 2**20 else 'n/a'} |"
        )


def print_row_block(block):
    for row in block:
        print(row, flush=True)


def tune(args):
    b, L = args.batch[-1], args.lengths[-1]
    n = args.dstate[0]
    inputs = ssd_inputs(b, L, args.heads, args.headdim, n, torch.float32)
    print(f"tuning chunk size: b={b} L={L} h={args.heads} p={args.headdim} n={n} fp32")
    print("| chunk | fwd ms | fwd+bwd ms | fwd x floor |")
    print("|---|---|---|---|")
    for chunk in args.tune_chunks:
        fn = functools.partial(ssd_chunked, chunk_size=chunk, dt_softplus=True)
        fwd, _, rate = run_case(fn, inputs, False, args.reps)
        fwd_bwd, _, _ = run_case(fn, inputs, True, args.reps)
        floor = ssd_flops(b, L, args.heads, args.headdim, n, chunk) / rate
        print(f"| {chunk} | {fwd * 1e3:.1f} | {fwd_bwd * 1e3:.1f} | {fwd / floor:.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="b=1, L in {512, 2048}, n=64, fp32, one rep")
    parser.add_argument("--tune", action="store_true", help="time our SSD scan per chunk size and exit")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dstate", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 256],
                        help="chunk sizes passed to both scans (a model's chunk_size; 256 is Mamba2Config's default)")
    parser.add_argument("--naive-max-len", type=int, default=512, help="run the sequential loop only up to this L")
    parser.add_argument("--d-inner", type=int, default=1024)
    parser.add_argument("--m1-dstate", type=int, default=16)
    parser.add_argument("--m1-lengths", type=int, nargs="+", default=[512, 2048],
                        help="Mamba-1 lengths (every variant holds several (b, d, n, L) fp32 tensors)")
    parser.add_argument("--no-mamba1", action="store_true")
    parser.add_argument("--no-mamba2", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tune-chunks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--compare-threads", type=int, nargs="+", default=None,
                        help="ours vs transformers' fallback (fwd+bwd) at these thread counts, with the spread")
    parser.add_argument("--runs", type=int, default=5, help="runs per row of --compare-threads")
    args = parser.parse_args()
    args.modes = [mode == "fwd+bwd" for mode in args.modes]
    if args.quick:
        args.batch, args.lengths, args.dstate, args.dtypes = [1], [512, 2048], [64], ["fp32"]
        args.m1_lengths, args.reps = [512], 1
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; our block size {DEFAULT_CHUNK_SIZE}; "
          "matmul GFLOP/s = best fp32 1024^3 GEMM, right before and after each variant's timed calls, the faster; "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')} (set by importing distill)")
    if args.tune:
        tune(args)
        return
    if args.compare_threads:
        compare_threads(args)
        return
    rows = []
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    if not args.no_mamba2:
        bench_mamba2(args, rows)
    if not args.no_mamba1:
        bench_mamba1(args, rows)


if __name__ == "__main__":
    main()
