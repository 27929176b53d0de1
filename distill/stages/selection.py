"""The `selection` stage: a mixer aligned for every layer of an all-Mamba student (or reused from the cache),
then, for `attention_layers: auto`, each layer scored by how much the teacher suffers when that one layer's
attention is swapped for its aligned mixer. `distill.selection.prepare_student` runs it before the other
stages and chooses the attention layers from its summary."""

from __future__ import annotations

import time
from pathlib import Path

from distill.selection import align_every_layer, aligned_dir, layer_scores


def train(ctx, cfg, student, stage_dir: Path):
    started = time.perf_counter()
    summary = align_every_layer(ctx, student, stage_dir)
    student.requires_grad_(False)
    summary.update(cache=aligned_dir(ctx.recipe, ctx.teacher).name, score_rows=cfg.score_rows)
    if ctx.recipe.student.attention_layers == "auto":
        folder = aligned_dir(ctx.recipe, ctx.teacher)
        summary["scores"], summary["score_seconds"] = layer_scores(ctx, student, folder)
    summary["seconds"] = time.perf_counter() - started
    return student, summary
