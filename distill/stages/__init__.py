"""Distillation stages. Each stage module exposes `run(ctx, index, cfg, student) -> student`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.recipe import Recipe


@dataclass
class StageContext:
    """Everything a stage needs besides its own config and the student it trains."""

    recipe: Recipe
    accelerator: Any  # accelerate.Accelerator
    teacher: Any  # frozen LlamaForCausalLM
    tokenizer: Any
    train: Any  # datasets.Dataset of rows in the batch format (docs/design.md)
    held_out: Any
    output_dir: Path  # the run's output_dir; stage i writes under output_dir / f"stage{i}-{cfg.name}"


def run_stage(ctx: StageContext, index: int, cfg, student):
    """Run one stage of the recipe and return the trained student."""
    from distill.stages import end_to_end, layerwise, stepwise

    runner = {"layerwise": layerwise.run, "stepwise": stepwise.run, "end_to_end": end_to_end.run}[cfg.name]
    return runner(ctx, index, cfg, student)
