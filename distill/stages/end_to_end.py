"""The `end_to_end` stage: the student's next-token distribution is trained towards the teacher's over the
whole model (a KL, reverse KL or JSD; see `distill.kl`), on the mixers, all weights or LoRA adapters."""

from __future__ import annotations

from pathlib import Path

from distill.kl import train_kl


def train(ctx, cfg, student, stage_dir: Path):
    return train_kl(ctx, cfg, student, stage_dir)
