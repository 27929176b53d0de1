"""Distillation stages. Each stage is the module `distill.stages.<name>` with `run(ctx, index, cfg, student)`.

A new stage (e.g. `sft`, `dpo`) is a module here with that `run`, plus its config class in `distill.recipe`;
it trains through `distill.trainer.train` with its own objective module, like `end_to_end` does.
"""

from __future__ import annotations

import importlib
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
    return importlib.import_module(f"distill.stages.{cfg.name}").run(ctx, index, cfg, student)


def run_trained(train, ctx: StageContext, index: int, cfg, student):
    """Run a stage written as `train(ctx, cfg, student, stage_dir, seed=, label=) -> (student, summary)`:
    reload it when an earlier run finished it, else train it and save its weights and summary."""
    from distill.trainer import finish, load_final, stage_finished

    stage_dir = Path(ctx.output_dir) / f"stage{index}-{cfg.name}"
    if stage_finished(stage_dir):
        return load_final(student, stage_dir)
    student, summary = train(ctx, cfg, student, stage_dir, seed=ctx.recipe.seed + index,
                             label=f"stage {index} ({cfg.name})")
    finish(ctx.accelerator, stage_dir, student, {"name": cfg.name, "index": index, **summary})
    return student
