"""Layerwise step time with the cached teacher activations in memory vs on disk, side by side.

    python scripts/bench_activation_cache.py [--fraction 0.25 --batch-size 4 --seq-len 256 --rows 16 --steps 4
                                              --reads 30]

SmolLM2-135M teacher, the student at `--fraction` attention (uniform layers), `precision: bf16` as the demo.
The activations of `--rows` rows are captured once into a `MemoryStore` and a `DiskStore` (what
`cache_storage: memory | disk` use); then three variants are interleaved on the same batches: the memory
store, the disk store with its file in the page cache (`disk-warm`: a cache smaller than free RAM) and the
disk store with the file's pages dropped before each read (`disk-cold`, posix_fadvise on that file only: a
cache larger than RAM at worst). `--reads` rounds time the cache read alone; `--steps` rounds time a whole
layerwise step (the read, each mixer's forward on its captured input with the MSE, the backward, the AdamW
step).
Prints median wall seconds (the disk's waits count) and the ratios to the memory store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_train import AutocastOnly  # scripts/ is on the path when a script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reads", type=int, default=30)
    parser.add_argument("--dir", default=None,
                        help="where the disk store's file goes (default: a temp folder)")
    args = parser.parse_args()

    from distill.alignment import (
        ActivationCache,
        DiskStore,
        LayerwiseObjective,
        MemoryStore,
        capture_teacher,
        mamba_layers,
    )
    from distill.init import hybrid_from_teacher
    from distill.recipe import LayerwiseStage, StudentConfig, TeacherConfig
    from distill.teacher import load_teacher
    from distill.trainer import param_groups, set_trainable

    teacher, _ = load_teacher(TeacherConfig(), dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    student_cfg = StudentConfig(attention_fraction=args.fraction, chunk_size=64)
    student = hybrid_from_teacher(teacher, student_cfg, seed=0)
    teacher = teacher.to(torch.bfloat16)
    set_trainable(student, "mixers")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    layers = mamba_layers(student)
    objective = LayerwiseObjective(student, layers, LayerwiseStage(name="layerwise", max_tokens=1))
    optimizer = torch.optim.AdamW(param_groups(student, 0.0, 1e-5), lr=1e-5)
    capture = capture_teacher(AutocastOnly(autocast), teacher, layers, "mixer_output")

    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.seq_len)
    ids = torch.randint(0, teacher.config.vocab_size, shape, generator=g)
    rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "position_ids": torch.arange(args.seq_len).expand(shape).contiguous(),
            "row": torch.arange(args.rows)}
    slots = [(part, i) for part in ("inputs", "outputs") for i in layers]
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench-activations-"))
    hidden = teacher.config.hidden_size
    memory = ActivationCache(capture, MemoryStore(args.rows, 0, max_gb=1))
    disk_store = DiskStore(folder / "store", args.rows, slots, args.seq_len, hidden, key={})
    disk = ActivationCache(capture, disk_store)
    for start in range(0, args.rows, args.batch_size):  # the first epoch: capture once into each store
        batch = {key: value[start : start + args.batch_size] for key, value in rows.items()}
        memory(batch), disk(batch)
    data_file = folder / "store" / "activations.bin"

    def drop_pages():
        fd = os.open(data_file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    variants = {"memory": (memory, None), "disk-warm": (disk, None), "disk-cold": (disk, drop_pages)}
    times = {name: {"step": [], "read": []} for name in variants}
    perm = torch.Generator().manual_seed(1)
    for round_ in range(1 + max(args.reads, args.steps)):  # round 0 warms up
        picked = torch.randperm(args.rows, generator=perm)[: args.batch_size]
        batch = {key: value[picked] for key, value in rows.items()}
        for name, (cache, before) in variants.items():
            if before:
                before()
            start = time.perf_counter()
            captured = cache(batch)
            read = time.perf_counter() - start
            if round_ and round_ <= args.reads:
                times[name]["read"].append(read)
            if round_ > args.steps:
                continue
            with autocast:
                loss = objective(batch, captured)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:
                times[name]["step"].append(time.perf_counter() - start)

    mib = args.rows * len(slots) * args.seq_len * hidden * 2 / 2**20
    print(f"SmolLM2-135M, {len(layers)} Mamba layers ({args.fraction:g} attention), batch {args.batch_size} "
          f"x {args.seq_len}, {args.rows} rows cached ({mib:.0f} MiB), {args.reads} interleaved reads and "
          f"{args.steps} steps, torch threads "
          f"{torch.get_num_threads()}, median wall seconds")
    base = {part: statistics.median(times["memory"][part]) for part in ("step", "read")}
    for name in variants:
        step_s, read_s = (statistics.median(times[name][part]) for part in ("step", "read"))
        print(f"{name:10} step {step_s:7.3f} s ({step_s / base['step']:.2f}x)   read {read_s:7.4f} s "
              f"({read_s / base['read']:.1f}x)")


if __name__ == "__main__":
    main()
