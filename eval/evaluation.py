"""`evaluate`: every comparison the recipe's `eval` section asks for, written as one report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from distill.eval import report as rep
from distill.eval.quality import compare_on_held_out
from distill.layout import RunLayout

logger = logging.getLogger("distill.eval")


def _recipe_of(run_info: dict) -> dict | str | None:
    """The resolved recipe the run wrote (`output_dir/recipe.yaml`), else whatever run_info carries."""
    output_dir = run_info.get("output_dir")
    if output_dir and RunLayout(output_dir).recipe.is_file():
        return yaml.safe_load(RunLayout(output_dir).recipe.read_text())
    return run_info.get("recipe")


def _stage_logs(run_info: dict) -> dict[str, list[dict]]:
    output_dir = run_info.get("output_dir")
    if not output_dir:
        return {}
    layout = RunLayout(output_dir)
    return {
        f"stage {i}: {stage.get('name', '?')}": rep.read_metrics_log(layout.stage(i, stage.get("name")))
        for i, stage in enumerate(run_info.get("stages", []))
    }


def evaluate(cfg, *, student, teacher, tokenizer, held_out, out_dir: Path, run_info: dict) -> dict:
    """Compare `student` with `teacher` as `cfg` (an EvalConfig) asks; writes report.json/.md and PNGs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.eval()
    teacher.eval()
    started = time.time()
    quality = compare_on_held_out(
        student, teacher, held_out, max_sequences=cfg.max_sequences, batch_size=cfg.batch_size
    )
    logger.info(
        "held-out: teacher ppl %.3f, student ppl %.3f, KL %.4f, top-1 agreement %.3f",
        quality["teacher"]["perplexity"],
        quality["student"]["perplexity"],
        quality["student"]["kl_to_teacher"],
        quality["student"]["top1_agreement"],
    )
    recipe = _recipe_of(run_info)
    report = {
        "teacher": quality["teacher"],
        "student": quality["student"],
        "held_out": {"tokens": quality["tokens"], "sequences": quality["sequences"]},
        "stages": run_info.get("stages", []),
        "wall_time_s": run_info.get("wall_time_s"),
        "recipe": recipe,
        "recipe_path": run_info.get("recipe") if isinstance(run_info.get("recipe"), str) else None,
    }
    if cfg.generation_prompts:
        from distill.eval.generations import judge_generations

        report["generations"] = judge_generations(
            student, teacher, tokenizer, held_out, prompts=cfg.generation_prompts,
            max_new_tokens=cfg.generation_max_new_tokens, temperature=cfg.generation_temperature,
            examples=cfg.generation_examples,
        )
        if report["generations"]:
            greedy = report["generations"]["greedy"]
            logger.info("generations: teacher NLL of the student's greedy answers %.3f vs its own %.3f "
                        "(perplexity ratio %.3f); shared greedy prefix %.1f tokens",
                        greedy["teacher_nll_of_student"], greedy["teacher_nll_of_teacher"],
                        greedy["perplexity_ratio"], greedy["shared_prefix"])
    models = {"teacher": teacher, "student": student}
    if cfg.lm_eval_tasks:
        from distill.eval.lm_eval_runner import run_lm_eval, summarize

        for name, model in models.items():
            out = run_lm_eval(model, cfg.lm_eval_tasks, tokenizer=tokenizer, limit=cfg.lm_eval_limit)
            report[name]["lm_eval"] = summarize(out["results"])
    plots = [rep.plot_losses(_stage_logs(run_info), out_dir / "training_loss.png")]
    if run_info.get("selection"):  # distill.selection's layer scores
        report["selection"] = run_info["selection"]
        plots.append(rep.plot_selection(report["selection"], out_dir / "selection.png"))
    if cfg.speed:
        from distill.eval.speed import benchmark

        report["speed"] = benchmark(
            models,
            cfg.speed_contexts,
            cfg.speed_batch_sizes,
            cfg.speed_steps,
            prefill_max_tokens=2048,
            log=logger.info,
        )
        report["speed_note"] = (
            "Speed: decode on top of a cache holding `context` tokens, all models measured back to back on "
            "the same machine (see distill.eval.speed)."
        )
        plots += rep.plot_speed(report["speed"], out_dir)
    if cfg.needle:
        from distill.eval.needle import haystack_tokens, mean_accuracy, passkey_accuracy

        filler = haystack_tokens(held_out, tokenizer)
        train_length = (recipe or {}).get("data", {}).get("max_length") if isinstance(recipe, dict) else None
        report["needle"] = {}
        for name, model in models.items():
            grid = passkey_accuracy(
                model, tokenizer, filler, cfg.needle_lengths, cfg.needle_depths, trials=cfg.needle_trials
            )
            grid["train_length"] = train_length
            report["needle"][name] = grid
            report[name]["needle_accuracy"] = mean_accuracy(grid)
        plots.append(rep.plot_needle(report["needle"], out_dir / "needle.png"))
    report["plots"] = [path.name for path in plots if path is not None]
    report["eval_time_s"] = round(time.time() - started, 1)
    rep.write_report(report, out_dir)
    logger.info("wrote %s", out_dir / "report.md")
    return report
