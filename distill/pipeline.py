"""The whole pipeline for one recipe: teacher -> data -> student -> stages -> final -> eval -> export.

Everything lands under the recipe's `output_dir` (`distill.layout.RunLayout`): `recipe.yaml` (resolved),
`run.log`, `selection/` when the recipe has that section, one folder per stage (checkpoints, `summary.json`,
`final/`), `final/` (the student + tokenizer + remote code), `eval/` and `export/<format>/`. A rerun skips
stages whose summary says they finished. Only the main process writes; every process trains.

The entry points are `distill run` (distill/cli.py) and distill/run.py, the script `accelerate launch` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from distill.errors import UserError
from distill.files import atomic_dir, write_text
from distill.layout import RunLayout, final_dir

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
logger = logging.getLogger("distill.pipeline")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """A recipe and its `--set` overrides, as `distill run`, `distill validate` and run.py take them."""
    parser.add_argument("recipe", help="a recipe YAML, e.g. recipes/smollm2-135m/hybrid50-mamba2.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set stages.0.max_tokens=2e5 (repeatable)")


def _console_filter(record: logging.LogRecord) -> bool:
    """The console shows the run's own lines (start, one per stage, the held-out summary) and real problems.

    The rest goes to run.log only: data and kernel notes, and accelerate's chatter at every checkpoint (its
    `[RANK 0] Saving current state ...` lines and the `Removed shared tensor` warning for the tied lm_head).
    """
    if record.name.startswith("accelerate"):
        return record.levelno >= logging.ERROR
    return record.levelno >= logging.WARNING or record.name in ("distill.pipeline", "distill.eval")


def _log_to_file(path: Path) -> None:
    """Everything at INFO and above goes to `path`; the console handlers keep what `_console_filter` passes.

    Only plain StreamHandlers on stderr/stdout count as the console (not, say, pytest's capture handlers)."""
    root = logging.getLogger()
    for console in root.handlers:
        if type(console) is logging.StreamHandler and console.stream in (sys.stderr, sys.stdout):
            console.addFilter(_console_filter)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)


def _stage_line(index: int, summary: dict) -> str:
    line = (f"stage {index} ({summary['name']}): {summary.get('tokens', 0):,} tokens in "
            f"{summary.get('wall_time_s', 0):.0f} s, "
            f"final loss {summary.get('final_loss', float('nan')):.4g}")
    before, after = summary.get("held_out_before") or {}, summary.get("held_out_after") or {}
    if "loss" in before and "loss" in after:
        line += f", held-out loss {before['loss']:.4g} -> {after['loss']:.4g}"
    return line


def save_final(student, tokenizer, out: Path, saved: Path | None = None) -> None:
    """Write the student, tokenizer and remote code to `out`, replacing it only once complete.

    `saved` is a folder where `student` was saved as it is (the last stage's final/): its weight files are
    hard-linked instead of written again, which spares a second copy of the weights on disk (32 GB for an
    8B student in fp32). Weight files are never changed in place, so the two folders cannot diverge."""
    from distill.modeling_hybrid import write_remote_code

    with atomic_dir(out) as tmp:
        if saved is None:
            student.save_pretrained(tmp)
        else:
            for path in saved.iterdir():
                if path.suffix == ".safetensors":
                    try:
                        os.link(path, tmp / path.name)
                    except OSError:  # another filesystem, or one without hard links
                        shutil.copy2(path, tmp / path.name)
                elif path.is_file():  # config, generation config, shard index, remote code: small copies
                    shutil.copy2(path, tmp / path.name)
        tokenizer.save_pretrained(tmp)
        write_remote_code(tmp)


def _check_kernel_backend() -> None:
    """A bad $DISTILL_KERNELS is a user mistake: say so before anything heavy starts."""
    from distill.kernels.dispatch import get_backend

    try:
        get_backend()
    except ValueError as err:
        raise UserError(str(err)) from None


def run(recipe, recipe_path: str | None = None) -> Path:
    """Run `recipe` end to end; returns the output directory."""
    import datasets
    import torch
    import transformers

    from distill.data import build_datasets, check_source
    from distill.eval.evaluation import evaluate
    from distill.export import export
    from distill.init import hybrid_from_teacher
    from distill.stages import StageContext, run_stage
    from distill.teacher import load_teacher, teacher_config
    from distill.trainer import make_accelerator, resolve_precision

    started = time.time()
    recipe = resolve_precision(recipe)  # before anything reads it, so recipe.yaml records what ran
    # their per-load/save bars (model shards, dataset caching) would sit between the stage bars
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    accelerator = make_accelerator(recipe)
    out = Path(recipe.output_dir)
    layout = RunLayout(out)
    with accelerator.main_process_first():  # the first process downloads, converts and caches; the rest reuse
        recipe.check_against_teacher(teacher_config(recipe.teacher).num_hidden_layers)
        check_source(recipe.data)
        _check_kernel_backend()
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            _log_to_file(layout.log)
        else:
            logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress messages is enough
        logger.info("run %s -> %s on %s (%s, %d process(es)), precision %s", recipe_path or "recipe", out,
                    accelerator.device, accelerator.distributed_type.value, accelerator.num_processes,
                    recipe.precision)
        teacher, tokenizer = load_teacher(recipe.teacher, dtype=getattr(torch, DTYPES[recipe.precision]))
        train, held_out = build_datasets(recipe.data, tokenizer, seed=recipe.seed)
        if recipe.data.answers == "teacher":  # pseudo-labels: answered once per process group, then cached
            from distill.generation import padding_id
            from distill.pseudo_labels import teacher_answer_rows

            teacher.to(accelerator.device)
            pad = padding_id(teacher, tokenizer)
            train = teacher_answer_rows(train, teacher, recipe.data, recipe.seed, pad)
    teacher.to(accelerator.device)
    # norm_init: rms_ratio calibrates each mixer's output scale on a few training rows
    calibration = torch.tensor(train[:4]["input_ids"]) if recipe.student.norm_init == "rms_ratio" else None
    ctx = StageContext(recipe=recipe, accelerator=accelerator, teacher=teacher, tokenizer=tokenizer,
                       train=train, held_out=held_out, output_dir=out)
    # the selection stage: mixers aligned for every layer, `auto` layers chosen
    if recipe.selection is not None:
        from distill.selection import prepare_student

        recipe, student = prepare_student(ctx, calibration)
        ctx.recipe = recipe
    else:
        student = hybrid_from_teacher(teacher, recipe.student, seed=recipe.seed,
                                      calibration_input_ids=calibration)
    # resolved: the chosen layers as a list, so a rerun of it skips the scoring
    if accelerator.is_main_process:
        write_text(layout.recipe, recipe.dump())
    names = [stage.name for stage in recipe.stages]
    for index, stage in enumerate(recipe.stages):  # a stage that finished on an earlier run just reloads
        student = run_stage(ctx, index, stage, student)
        if accelerator.is_main_process:
            logger.info(_stage_line(index, layout.stage_summaries(names)[index]))
    student = accelerator.unwrap_model(student)

    if accelerator.is_main_process:
        last = final_dir(layout.stage(len(names) - 1, names[-1])) if names else None
        save_final(student, tokenizer, layout.final, saved=last)
        run_info = {"recipe": recipe_path, "output_dir": str(out), "num_processes": accelerator.num_processes,
                    "stages": layout.stage_summaries(names), "wall_time_s": round(time.time() - started, 1)}
        if layout.selection_record.is_file():
            run_info["selection"] = json.loads(layout.selection_record.read_text())
        if recipe.eval.enabled:
            evaluate(recipe.eval, student=student, teacher=teacher, tokenizer=tokenizer, held_out=held_out,
                     out_dir=layout.eval, run_info=run_info)
        for fmt in recipe.export.formats:  # the hub gets the first format only: one repo holds one model
            push = recipe.export.push_to_hub if fmt == recipe.export.formats[0] else None
            export(layout.final, fmt, layout.export(fmt), push_to_hub=push,
                   max_shard_size=recipe.export.max_shard_size, outtype=recipe.export.gguf_outtype)
        outputs = [("final checkpoint", layout.final)]
        outputs += [("eval report", layout.eval / "report.md")] if recipe.eval.enabled else []
        outputs += [(f"{fmt} export", layout.export(fmt)) for fmt in recipe.export.formats]
        outputs += [("resolved recipe", layout.recipe), ("log", layout.log)]
        print(f"\ndone in {time.time() - started:.0f}s; outputs in {out.resolve()}:")
        for label, path in outputs:
            print(f"  {label:<18}{path}")
    # no barrier here: the other processes may finish while the main one evaluates (which can outlast
    # the process group's timeout when lm-eval tasks run)
    accelerator.end_training()
    return out
