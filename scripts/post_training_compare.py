"""After layerwise distillation, at equal CPU time: fixed-data end-to-end KL vs on-policy distillation vs
SFT on the teacher's answers, judged on held-out teacher-forced metrics and on what the student generates.

    python scripts/post_training_compare.py        # base checkpoint once, then every arm, then the table
    python scripts/post_training_compare.py --cpu-seconds 300 --layerwise-tokens 2e5
    python scripts/post_training_compare.py --arm 0 & python scripts/post_training_compare.py --arm 1 & ...

With --arm, one process runs that arm only (the others wait for the base checkpoint the first one trains) and
writes OUT/results-<arm>.json; a run without --arm collects every result file into the table.

The base is the demo recipe cut down (uniform odd attention layers instead of data-chosen ones, a shorter
layerwise stage). Each arm starts from the base's layerwise checkpoint and trains one more stage; its token
budget is set from a short probe of that stage so its CPU time (this process's user + system seconds, which
a shared machine's other load does not inflate as it does wall time) matches `--cpu-seconds`. The teacher's
answers for the SFT arm are generated once and cached; their CPU time is reported beside the arm's. Results
go to OUT/results.json (finished arms are skipped on a rerun) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes/smollm2-135m/hybrid50-mamba2.yaml"
ARMS = {
    "layerwise only": None,
    "end_to_end (forward KL, fixed data)": {
        "name": "end_to_end",
        "lr": 3e-4,
        "batch_size": 4,
        "kl": "forward",
        "trainable": "mixers",
    },
    "on_policy (reverse KL)": {
        "name": "on_policy",
        "lr": 3e-4,
        "batch_size": 4,
        "kl": "reverse",
        "trainable": "mixers",
        "max_new_tokens": 48,
        "max_prompt_tokens": 192,
    },
    "sft on teacher answers (CE + 0.1 KL)": {
        "name": "sft",
        "lr": 3e-4,
        "batch_size": 4,
        "kl_weight": 0.1,
        "trainable": "mixers",
        "teacher_answers": True,
    },
}


def cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def base_recipe(out: Path, layerwise_tokens: float, base: str | None):
    """The demo recipe cut to its layerwise stage; with `base`, that run's resolved recipe (its chosen
    layers)."""
    from distill.recipe import load_recipe

    sets = [
        f"stages.0.max_tokens={layerwise_tokens}",
        "stages.0.checkpoint_every_tokens=5e4",
        "eval.enabled=false",
        f"output_dir={out}",
        "selection=null",
    ]
    if base is None:
        sets.append("student.attention_layers=uniform")
    recipe = load_recipe(Path(base) / "recipe.yaml" if base else DEMO, sets)
    recipe.stages = recipe.stages[:1]
    return recipe


def setup(out: Path, layerwise_tokens: float, base: str | None):
    """Teacher, data and the base student (its layerwise stage trained once, then reloaded)."""
    import torch

    from distill.data import build_datasets
    from distill.init import hybrid_from_teacher
    from distill.stages import StageContext, run_stage
    from distill.teacher import load_teacher
    from distill.trainer import make_accelerator

    recipe = base_recipe(out / "base", layerwise_tokens, base)
    accelerator = make_accelerator(recipe)
    teacher, tokenizer = load_teacher(recipe.teacher, dtype=torch.float32)
    train, held_out = build_datasets(recipe.data, tokenizer, seed=recipe.seed)
    calibration = torch.tensor(train[:4]["input_ids"])
    ctx = StageContext(
        recipe=recipe,
        accelerator=accelerator,
        teacher=teacher,
        tokenizer=tokenizer,
        train=train,
        held_out=held_out,
        output_dir=out / "base",
    )
    student = hybrid_from_teacher(
        teacher, recipe.student, seed=recipe.seed, calibration_input_ids=calibration
    )
    started = cpu()
    student = run_stage(ctx, 0, recipe.stages[0], student)
    return ctx, student, cpu() - started


def train_arm(ctx, base_student, out: Path, stage: dict, budget: float):
    """A copy of the base student trained by `stage` for `budget` tokens in `out`; returns (student,
    CPU seconds)."""
    import copy

    from distill.recipe import recipe_from_dict
    from distill.stages import run_stage

    stage = {k: v for k, v in stage.items() if k != "teacher_answers"}
    cfg = recipe_from_dict({"stages": [{**stage, "max_tokens": int(budget), "held_out_rows": 0}]}).stages[0]
    ctx.output_dir = out
    student = copy.deepcopy(base_student)
    started = cpu()
    student = run_stage(ctx, 1, cfg, student)
    return student, cpu() - started


def evaluate(ctx, student, args) -> dict:
    from distill.eval.generations import judge_generations
    from distill.eval.quality import compare_on_held_out

    student.eval()
    quality = compare_on_held_out(
        student, ctx.teacher, ctx.held_out, max_sequences=args.held_out, batch_size=4
    )
    generations = judge_generations(
        student,
        ctx.teacher,
        ctx.tokenizer,
        ctx.held_out,
        prompts=args.prompts,
        max_new_tokens=args.new_tokens,
        examples=2,
    )
    return {
        "perplexity_ratio": quality["student"]["perplexity"] / quality["teacher"]["perplexity"],
        "kl": quality["student"]["kl_to_teacher"],
        "top1": quality["student"]["top1_agreement"],
        "generation": generations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/post-training")
    parser.add_argument("--cpu-seconds", type=float, default=240.0, help="CPU seconds of each arm's stage")
    parser.add_argument("--layerwise-tokens", default="1e5")
    parser.add_argument("--arm", type=int, help="run only this arm (its index in ARMS)")
    parser.add_argument(
        "--base",
        help="a finished run folder (recipe.yaml; OUT/base/stage0-layerwise holds a copy "
        "of its layerwise stage) to start from instead of training the base",
    )
    parser.add_argument(
        "--teacher-prompts", type=int, default=160, help="prompts the teacher answers (SFT arm)"
    )
    parser.add_argument(
        "--held-out", type=int, default=32, help="held-out rows for the teacher-forced metrics"
    )
    parser.add_argument(
        "--prompts", type=int, default=24, help="held-out prompts the generations are judged on"
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per judged answer")
    args = parser.parse_args()
    import datasets
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in sorted(out.glob("results-*.json")):
        results.update(json.loads(path.read_text()))
    names = list(ARMS) if args.arm is None else [list(ARMS)[args.arm]]
    if all(name in results for name in names):
        print(table(results))
        return
    base_done = out / "base" / "stage0-layerwise" / "summary.json"
    while args.arm and not base_done.is_file():  # arm 0 trains the base checkpoint; the others reuse it
        time.sleep(10)
    ctx, base, base_cpu = setup(out, float(args.layerwise_tokens), args.base)
    results.setdefault(
        "_setup",
        {
            "layerwise_tokens": float(args.layerwise_tokens),
            "cpu_seconds": args.cpu_seconds,
            "threads": torch.get_num_threads(),
            "held_out": args.held_out,
            "prompts": args.prompts,
            "new_tokens": args.new_tokens,
        },
    )
    data_rows, pad_id = ctx.train, ctx.tokenizer.pad_token_id
    for name in names:
        stage = ARMS[name]
        if name in results:
            continue
        record: dict = {}
        if stage is None:
            student = base
            record["stage_cpu_s"] = base_cpu
        else:
            ctx.train = data_rows
            if stage.get("teacher_answers"):
                from distill.pseudo_labels import teacher_answer_rows

                data_cfg = ctx.recipe.data.model_copy(update={"answer_max_new_tokens": args.new_tokens})
                few = data_rows.select(
                    range(min(args.teacher_prompts // 2, len(data_rows)))
                )  # ~2 documents a row
                started = cpu()
                ctx.train = teacher_answer_rows(few, ctx.teacher, data_cfg, ctx.recipe.seed, pad_id)
                record["teacher_answers_cpu_s"] = cpu() - started
                record["teacher_answer_rows"] = len(ctx.train)
            probe_dir = out / "probe" / name.split()[0]
            shutil.rmtree(probe_dir, ignore_errors=True)
            probe_tokens = 2000 if stage["name"] != "on_policy" else 4 * 64 * 3
            _, probe_cpu = train_arm(ctx, base, probe_dir, stage, probe_tokens)
            budget = probe_tokens * args.cpu_seconds / probe_cpu
            arm_dir = out / name.split()[0]
            started_wall = time.time()
            student, stage_cpu = train_arm(ctx, base, arm_dir, stage, budget)
            record.update(tokens=int(budget), stage_cpu_s=stage_cpu, stage_wall_s=time.time() - started_wall)
        record.update(evaluate(ctx, student, args))
        results[name] = record
        setup_info = {"_setup": results["_setup"]}
        (out / f"results-{list(ARMS).index(name)}.json").write_text(
            json.dumps({**setup_info, name: record}, indent=2)
        )
        print(name, json.dumps({k: v for k, v in record.items() if k != "generation"}), flush=True)
    print(table(results))


def table(results: dict) -> str:
    lines = [
        (
            "| arm | tokens | stage CPU s | held-out ppl ratio | KL | top-1 | gen. ppl ratio (greedy) | "
            "gen. ppl ratio (sampled) | shared greedy prefix |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        g = r["generation"]
        extra = (
            f" (+{r['teacher_answers_cpu_s']:.0f} teacher answers)" if "teacher_answers_cpu_s" in r else ""
        )
        lines.append(
            f"| {name} | {r.get('tokens', '-')} | {r['stage_cpu_s']:.0f}{extra} "
            f"| {r['perplexity_ratio']:.3f} "
            f"| {r['kl']:.3f} | {r['top1']:.3f} | {g['greedy']['perplexity_ratio']:.3f} | "
            f"{g['sampled']['perplexity_ratio']:.3f} | {g['greedy']['shared_prefix']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
