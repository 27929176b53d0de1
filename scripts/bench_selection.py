"""Selection's swap scoring on SmolLM2-135M: the layers before each swap replayed (what `swap_scores` does)
against whole forwards with the swap in place, side by side, interleaved.

    python scripts/bench_selection.py [--rows 4 --seq-len 128 --repeats 3]

One swap per layer of the 30, on `--rows` random rows, batch 4, fp32, one torch thread (thread CPU time, so
other jobs on a shared machine do not inflate it). Prints each variant's seconds per scoring pass (median over
the repeats, which alternate the variants), their ratio, and the largest difference between the two variants'
scores (the same ops on the same inputs: at fp32 rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


@torch.no_grad()
def whole_forward_scores(teacher, mixers: dict, rows, batch_size: int) -> list[float]:
    """The reference: each swap scored by a whole forward of the teacher with that layer swapped."""
    from distill.data import loss_positions, model_inputs
    from distill.losses import distill_kl
    from distill.selection import swap_attention
    from distill.trainer import batches

    totals, count = dict.fromkeys(mixers, 0.0), 0
    for batch in batches(rows, batch_size, torch.device("cpu")):
        inputs, mask = model_inputs(batch), loss_positions(batch["labels"])
        reference = teacher.model(**inputs).last_hidden_state
        count += int(mask.sum())
        for i, mixer in mixers.items():
            handle = swap_attention(teacher, i, mixer, batch["position_ids"])
            try:
                hidden = teacher.model(**inputs).last_hidden_state
            finally:
                handle.remove()
            totals[i] += float(distill_kl(hidden, reference, mask, student_head=teacher.lm_head.weight,
                                          teacher_head=teacher.lm_head.weight, reduction="sum"))
    return [totals[i] / count for i in mixers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from datasets import Dataset

    from distill.init import hybrid_from_teacher
    from distill.recipe import StudentConfig, TeacherConfig, recipe_from_dict
    from distill.selection import swap_scores
    from distill.teacher import load_teacher
    from distill.trainer import make_accelerator

    teacher, _ = load_teacher(TeacherConfig(), dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    # timing only: the mixers' init does not matter (rms_ratio would need calibration rows)
    config = StudentConfig(attention_layers=[], norm_init="ones")
    student = hybrid_from_teacher(teacher, config, seed=0).eval()
    mixers = {i: layer.mamba for i, layer in enumerate(student.model.layers)}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, teacher.config.vocab_size, (args.rows, args.seq_len), generator=g)
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "position_ids": torch.arange(args.seq_len).expand(ids.shape).tolist(),
                              "labels": ids.tolist(), "row": list(range(args.rows))})
    # the recipe's defaults: CPU, fp32 (no autocast)
    accelerator = make_accelerator(recipe_from_dict({"stages": [{"name": "end_to_end", "max_tokens": 1}]}))
    variants = {
        "replayed": lambda: swap_scores(accelerator, teacher, mixers, rows, batch_size=4),
        "whole forwards": lambda: whole_forward_scores(teacher, mixers, rows, batch_size=4),
    }
    print(f"SmolLM2-135M, {len(mixers)} single-layer swaps, {args.rows} rows x {args.seq_len} tokens, "
          f"batch 4, fp32, 1 thread, {args.repeats} interleaved repeats (thread CPU seconds)")
    seconds, scores = {name: [] for name in variants}, {}
    for _ in range(args.repeats):
        for name, score in variants.items():
            start = time.thread_time()
            scores[name] = score()
            seconds[name].append(time.thread_time() - start)
    for name, runs in seconds.items():
        print(f"{name:15} {statistics.median(runs):7.1f} s  (runs: {', '.join(f'{s:.1f}' for s in runs)})")
    ratio = statistics.median(seconds["whole forwards"]) / statistics.median(seconds["replayed"])
    print(f"replayed is {ratio:.2f}x faster; largest score difference "
          f"{max(abs(a - b) for a, b in zip(*scores.values(), strict=True)):.2e} nats "
          f"(scores {min(scores['replayed']):.3f}-{max(scores['replayed']):.3f})")


if __name__ == "__main__":
    main()
