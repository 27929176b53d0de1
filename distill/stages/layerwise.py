"""The `layerwise` stage: each Mamba mixer learns the output of the attention it replaced (or its block the
teacher block's output), on the teacher's own hidden states or the student's, with the MLPs frozen (MOHAWK's
hidden-state alignment; see `distill.alignment`)."""

from __future__ import annotations

from pathlib import Path

from distill.alignment import align


def train(ctx, cfg, student, stage_dir: Path):
    return student, align(ctx, cfg, student, stage_dir)
