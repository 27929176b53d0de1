"""Step-0 quality of each initialisation of a 50% Mamba-2 student of SmolLM2, side by side.

    python scripts/init_compare.py [--rows 16] [--fraction 0.5] [--mixer mamba2]

No training: each variant is built with `hybrid_from_teacher` and scored against the teacher on the same
held-out rows (perplexity on assistant tokens, KL(teacher||student), top-1 agreement). This isolates what
the initialisation itself contributes; scripts/study.py measures what is left of it after distillation.
"""

from __future__ import annotations

import argparse

import torch

from distill.data import build_datasets
from distill.eval.quality import compare_on_held_out
from distill.init import hybrid_from_teacher
from distill.recipe import DataConfig, StudentConfig, TeacherConfig
from distill.teacher import load_teacher

VARIANTS = {
    "random": {"init": "random", "norm_init": "ones", "conv_init": "random"},
    "attention (reference)": {"norm_init": "ones", "conv_init": "random"},
    "attention + identity conv": {"norm_init": "ones", "conv_init": "identity"},
    "attention + rms_ratio norm": {"norm_init": "rms_ratio", "conv_init": "random"},
    "attention + rms_ratio + identity conv": {"norm_init": "rms_ratio", "conv_init": "identity"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="held-out rows of 256 tokens")
    parser.add_argument("--fraction", type=float, default=0.5, help="attention fraction")
    parser.add_argument("--mixer", choices=["mamba2", "mamba1"], default="mamba2")
    args = parser.parse_args()

    teacher, tokenizer = load_teacher(TeacherConfig(), dtype=torch.float32)
    train, held_out = build_datasets(
        DataConfig(max_length=256, max_conversations=200, held_out_size=args.rows), tokenizer, seed=0
    )
    calibration = torch.tensor(train[:4]["input_ids"])
    print(f"{'variant':40s} {'perplexity':>12s} {'KL':>7s} {'top-1':>6s}")
    for name, options in VARIANTS.items():
        cfg = StudentConfig(mixer=args.mixer, attention_layers="uniform", attention_fraction=args.fraction, **options)
        student = hybrid_from_teacher(teacher, cfg, seed=0, calibration_input_ids=calibration).eval()
        quality = compare_on_held_out(student, teacher, held_out, max_sequences=args.rows)
        s = quality["student"]
        print(f"{name:40s} {s['perplexity']:12.1f} {s['kl_to_teacher']:7.3f} {s['top1_agreement']:6.3f}", flush=True)
    print(f"teacher perplexity {quality['teacher']['perplexity']:.2f} on {quality['tokens']} loss tokens")


if __name__ == "__main__":
    main()
