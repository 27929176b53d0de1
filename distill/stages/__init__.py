"""Distillation stages, and the one runner that runs every one of them.

The contract. A stage is a module `distill.stages.<name>` that defines only its training:

    def train(ctx: StageContext, cfg, student, stage_dir: Path) -> tuple[student, dict]

`cfg` is the stage's recipe entry (a subclass of `distill.recipe.StageConfig`), `student` the
`HybridForCausalLM` it trains (any supported teacher family), `stage_dir` its folder, where it trains through
`distill.trainer.train` (checkpoints, metrics, resume). It returns the trained student and a JSON-able summary
(tokens, steps, wall_time_s, final_loss, held-out losses before and after, anything of its own).
`ctx.seed` seeds its data order and `ctx.label` names it in the progress bar.

Everything else is the runner's (`run_stage`): skipping a stage whose summary says it finished (its final
weights are loaded instead), the stage's label and seed, and saving its final weights and then its summary,
which marks it finished. The folder names are `distill.layout.RunLayout`'s.

Adding a stage: one module here with `train`, one config class in `distill.recipe` (a `StageConfig` with
`name: Literal["<name>"]`, added to `Stage`), and one line in `STAGES` below.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import TrainingError
from distill.files import write_text
from distill.layout import RunLayout, checkpoints_dir, final_dir, finished_summary, summary_path
from distill.recipe import Recipe

logger = logging.getLogger(__name__)

# stage name (the recipe's `name`) -> the module defining its `train`; imported when the stage runs
STAGES = {
    "selection": "distill.stages.selection",
    "layerwise": "distill.stages.layerwise",
    "stepwise": "distill.stages.stepwise",
    "end_to_end": "distill.stages.end_to_end",
    "on_policy": "distill.stages.on_policy",
    "sft": "distill.stages.sft",
    "dpo": "distill.stages.dpo",
}


@dataclass
class StageContext:
    """Everything a stage needs besides its own config and the student it trains."""

    recipe: Recipe
    accelerator: Any  # accelerate.Accelerator
    teacher: Any  # the frozen teacher, a causal LM of a supported family (distill.families)
    tokenizer: Any
    train: Any  # datasets.Dataset of rows in the batch format (distill.data)
    held_out: Any
    output_dir: Path  # the run's output_dir (see `layout`)
    seed: int = 0  # set by the runner for each stage
    label: str = ""  # the stage's name in progress bars and messages, set by the runner

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.output_dir)


def run_stage(ctx: StageContext, index: int, cfg, student):
    """Run stage `index` of the recipe (its folder `stage{index}-{name}`) and return the trained student."""
    return run(ctx, cfg, student, ctx.layout.stage(index, cfg.name), label=f"stage {index} ({cfg.name})",
               seed=ctx.recipe.seed + index, index=index)


def run(ctx: StageContext, cfg, student, stage_dir: Path, *, label: str, seed: int, index: int | None = None,
        train=None):
    """Run a stage (or one part of one, with `train` standing for the stage's own) in `stage_dir`.

    A finished stage is not trained again: its final weights are loaded into `student`."""
    if finished_summary(stage_dir):
        logger.info("%s finished earlier; its final weights are loaded from %s", label, final_dir(stage_dir))
        return load_final(student, stage_dir)
    train = train or importlib.import_module(STAGES[cfg.name]).train
    student, summary = train(dataclasses.replace(ctx, seed=seed, label=label), cfg, student, Path(stage_dir))
    head = {"name": cfg.name} if index is None else {"name": cfg.name, "index": index}
    save_finished(ctx.accelerator, stage_dir, student, {**head, **summary})
    return student


def save_finished(accelerator, stage_dir: Path, student, summary: dict) -> None:
    """Save the stage's final weights, then its summary (last: it marks completion), then drop checkpoints."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        student.save_pretrained(final_dir(stage_dir))
        write_text(summary_path(stage_dir), json.dumps({**summary, "finished": True}, indent=2))
        shutil.rmtree(checkpoints_dir(stage_dir), ignore_errors=True)
    accelerator.wait_for_everyone()


def load_final(student, stage_dir: Path):
    """Load a finished stage's final weights into `student` (same architecture) and return it."""
    from safetensors.torch import load_file

    final = final_dir(stage_dir)
    state = {}
    for shard in sorted(final.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and student.config.tie_word_embeddings}
    if unexpected or set(missing) - tied:
        raise TrainingError(
            f"{final} does not match the student (missing {sorted(set(missing) - tied)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); delete {stage_dir} to retrain that stage"
        )
    return student
