"""`distill eval --student DIR --teacher DIR [--data SOURCE] [--out DIR] [--tasks ...] [--speed] [--needle]`.

Works on a run's output (`--student outputs/run/final`: the run's recipe, held-out split and stage logs are
picked up from the folder above) and on any pair of HF checkpoint folders (teacher vs itself gives KL = 0).
A stock transformers student with Mamba layers (e.g. our `distill export --format bamba` output) runs our CPU
kernels through transformers' kernel hook (distill.kernels.transformers_hook), as the native hybrid does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.errors import UserError
from distill.layout import RunLayout


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="distill eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--student", required=True, type=Path, help="checkpoint folder (native hybrid or any HF LM)"
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="teacher folder, hub id, GGUF or 'smollm2-135m-instruct' (default: the run's teacher)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="held-out source: json/jsonl/parquet file or datasets name (default: the run's data, "
        "else the built-in ShareGPT held-out split)",
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="held-out row length (default: the run's)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: <run>/eval or ./eval-report)"
    )
    parser.add_argument(
        "--tasks", nargs="*", default=[], help="lm-eval tasks, e.g. sharegpt_ppl sharegpt_next_sentence"
    )
    parser.add_argument("--limit", type=int, default=None, help="lm-eval examples per task")
    parser.add_argument("--max-sequences", type=int, default=64, help="held-out rows to score")
    parser.add_argument("--speed", action="store_true", help="also run the decode speed/memory benchmark")
    parser.add_argument("--needle", action="store_true", help="also run passkey retrieval")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def _run_dir(student: Path) -> Path | None:
    """The run output folder when `student` is its `final/` (or a stage's `final/`)."""
    for candidate in (student.parent, student.parent.parent):
        if (candidate / "recipe.yaml").is_file():
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import distill.modeling_hybrid  # noqa: F401  (registers the hybrid with the Auto classes)
    from distill.data import build_datasets
    from distill.eval.evaluation import evaluate
    from distill.kernels.transformers_hook import use_in_transformers
    from distill.recipe import DataConfig, EvalConfig, Recipe, TeacherConfig, load_recipe
    from distill.teacher import load_teacher

    args = _parse(argv)
    if not (args.student / "config.json").is_file():
        raise UserError(
            f"--student {args.student}: not a checkpoint folder (no config.json); pass e.g. outputs/run/final"
        )
    run_dir = _run_dir(args.student)
    recipe: Recipe | None = load_recipe(run_dir / "recipe.yaml") if run_dir else None
    if args.teacher is None and recipe is None:
        raise UserError(
            "--teacher is required when --student is not a run's final/ folder; pass the teacher folder"
        )
    teacher_cfg = TeacherConfig(source=args.teacher) if args.teacher else recipe.teacher
    data_cfg = recipe.data if recipe else DataConfig(held_out_size=args.max_sequences)
    updates = {k: v for k, v in (("source", args.data), ("max_length", args.max_length)) if v is not None}
    # Held-out rows come first from the seeded shuffle, so one train conversation is enough to rebuild the
    # run's held-out split (or a prefix of it) without tokenizing the whole training set.
    data_cfg = data_cfg.model_copy(update={**updates, "max_conversations": 1})

    teacher, tokenizer = load_teacher(teacher_cfg, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32, trust_remote_code=True)
    teacher.to(args.device)
    student = use_in_transformers(student.to(args.device))
    _, held_out = build_datasets(data_cfg, tokenizer, seed=recipe.seed if recipe else 0)

    cfg = EvalConfig(
        max_sequences=args.max_sequences,
        lm_eval_tasks=args.tasks,
        lm_eval_limit=args.limit,
        speed=args.speed,
        needle=args.needle,
    )
    run_info = {
        "recipe": str(RunLayout(run_dir).recipe) if run_dir else None,
        "output_dir": str(run_dir) if run_dir else None,
        "stages": RunLayout(run_dir).stage_summaries([stage.name for stage in recipe.stages]) if recipe else [],
    }
    out = args.out or (RunLayout(run_dir).eval if run_dir else Path("eval-report"))
    report = evaluate(
        cfg,
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        held_out=held_out,
        out_dir=out,
        run_info=run_info,
    )
    from distill.eval.report import markdown_table

    print(markdown_table(report))
    print(f"\nreport: {out / 'report.md'}")
    return 0
