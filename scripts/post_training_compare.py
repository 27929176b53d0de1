"""After layerwise distillation, at equal CPU time: fixed-data end-to-end KL vs on-policy distillation (and
GKD's mix) vs SFT on the teacher's answers vs sequence-level KD (end-to-end KL on the teacher's answers, alone
or alternating with data rows), each optionally followed by DPO on teacher-vs-student pairs, judged on
held-out teacher-forced metrics and on what the student generates (docs/post-training.md).

    python scripts/post_training_compare.py        # base checkpoint once, then every arm, then the table
    python scripts/post_training_compare.py --base RUN_DIR --arm 1 --tokens 2.4e4   # one arm, a fixed budget
    python scripts/post_training_compare.py --base RUN_DIR --arm 2 --cpu-seconds 250
    python scripts/post_training_compare.py --base RUN_DIR --arm 5 --after 1 --tokens 2e4   # dpo after arm 1
    python scripts/post_training_compare.py --base RUN_DIR --arm 2 --after 1 --tokens 2e3  # on_policy after 1
    python scripts/post_training_compare.py --base RUN_DIR --after 1 --probe-dpo 3e-5 3e-4   # dpo's lr
    python scripts/post_training_compare.py --base RUN_DIR --rejudge --prompts 80 --greedy-only   # every arm
    python scripts/post_training_compare.py --arm 0 --plot docs/post-training.png   # table and plot

With --arm, one process runs that arm only (the others wait for the base checkpoint the first one trains) and
writes OUT/results-<arm>.json; every run prints the table of the result files there.

The base is the demo recipe cut down (uniform odd attention layers instead of data-chosen ones, a shorter
layerwise stage), or with --base a finished run's layerwise stage (copy its stage0-layerwise/ into OUT/base/).
Each arm starts from the base's layerwise checkpoint (or from the arm --after names: dpo always does) and
trains one more stage; its token budget is --tokens, or is set from a short probe of that stage so its CPU
time (this process's user + system seconds, which a shared machine's other load does not inflate as wall time)
matches --cpu-seconds. The teacher's answers for the SFT arm are generated first; their CPU time is reported
beside the arm's. The judge's prompts are never trained on: the held-out rows', then those of the documents
after the training split, less any that is also a training prompt. The table gives 5-95% bootstrap intervals
over the judged prompts, and paired ones against the end_to_end arm.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from distill.errors import UserError
from distill.files import write_text

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes/smollm2-135m/hybrid50-mamba2.yaml"
DPO_ARM = "dpo (teacher vs student)"
JUDGE_PROMPT_TOKENS = 256  # the judge skips longer prompts
# sequence-level KD (Kim & Rush, 2016): end_to_end's forward KL, on the teacher's own answers
SEQKD = {
    "name": "sft",
    "lr": 3e-4,
    "batch_size": 4,
    "ce_weight": 0.0,
    "kl_weight": 1.0,
    "trainable": "mixers",
    "teacher_answers": True,
}
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
    "gkd (reverse KL, lmbda 0.5)": {
        "name": "on_policy",
        "lr": 3e-4,
        "batch_size": 4,
        "kl": "reverse",
        "lmbda": 0.5,
        "trainable": "mixers",
        "max_new_tokens": 48,
        "max_prompt_tokens": 192,
    },
    DPO_ARM: {  # after another arm (--after): its pairs cost the stage's CPU too
        "name": "dpo",
        "lr": 3e-5,
        "batch_size": 4,
        "beta": 0.1,
        "reference": "student",
        "trainable": "mixers",
        "max_pairs": 32,
        "max_new_tokens": 48,
        "max_prompt_tokens": 192,
        "after": True,
    },
    "seqkd (forward KL on teacher answers)": SEQKD,
    # the same, on the teacher's answers and as many data rows, alternating: the answers for the generations,
    # the data for the teacher-forced metrics
    "mixed (forward KL on teacher answers + data rows)": {**SEQKD, "teacher_answers": "mixed"},
}


def cpu() -> float:
    """This process's user + system CPU seconds: what a shared machine's other load does not inflate."""
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

    stage = {k: v for k, v in stage.items() if k not in ("teacher_answers", "after")}
    cfg = recipe_from_dict({"stages": [{**stage, "max_tokens": int(budget), "held_out_rows": 0}]}).stages[0]
    ctx.output_dir = out
    student = copy.deepcopy(base_student)
    started = cpu()
    student = run_stage(ctx, 1, cfg, student)
    return student, cpu() - started


def arm_dir(out: Path, name: str) -> Path:
    return out / name.split()[0]


def judge_rows(ctx, prompts: int):
    """Rows whose first exchanges the judge answers: the held-out rows, then as many documents from after the
    training split as `prompts` needs more (the data's order holds the held-out documents, then the
    max_conversations training documents, then documents no stage reads), one a row. A row whose prompt is
    also a training document's prompt (a conversation repeated in the data) is left out: the judge's prompts
    are never trained on."""
    import datasets

    from distill.data import build_datasets
    from distill.generation import exchanges

    data = ctx.recipe.data
    rows = ctx.held_out
    if prompts > len(rows):
        after = data.held_out_size + data.max_conversations
        cfg = data.model_copy(update={"held_out_size": after + 2 * prompts, "max_conversations": 1})
        _, everything = build_datasets(cfg, ctx.tokenizer, seed=ctx.recipe.seed)
        if everything[: len(rows)]["input_ids"] != rows["input_ids"]:  # the split's order, checked
            raise SystemExit("the data's first documents are not the held-out rows: the split has changed")
        rows = datasets.concatenate_datasets([rows, everything.select(range(after, len(everything)))])
    trained = {tuple(ex.prompt) for ex in exchanges(ctx.train, data.max_length)}
    unseen = [
        i
        for i in range(len(rows))
        if not trained & {tuple(ex.prompt) for ex in exchanges(rows.select([i]), 10**9)}
    ]
    print(f"judge: {len(rows) - len(unseen)} of {len(rows)} rows left out (a training prompt)", flush=True)
    return rows.select(unseen)


def judge(ctx, student, args) -> dict:
    """The generation metrics; the teacher's answers are the same for every arm: generated by the first arm
    judged, then read back from a file (which also holds the prompts, checked)."""
    from distill.eval.generations import judge_generations
    from distill.generation import exchanges

    rows = judge_rows(ctx, args.prompts)
    prompts = [ex.prompt for ex in exchanges(rows, JUDGE_PROMPT_TOKENS)][: args.prompts]
    side_file = Path(args.out) / f"teacher-side-{args.prompts}x{args.new_tokens}-seed{args.judge_seed}.json"
    side = json.loads(side_file.read_text()) if side_file.is_file() else {"prompts": prompts}
    if side.get("prompts") != prompts:
        raise SystemExit(f"{side_file} holds the teacher's answers to other prompts: delete it")
    student.eval()
    generations = judge_generations(
        student,
        ctx.teacher,
        ctx.tokenizer,
        rows,
        prompts=args.prompts,
        max_new_tokens=args.new_tokens,
        examples=2,
        seed=args.judge_seed,
        max_prompt_tokens=JUDGE_PROMPT_TOKENS,
        teacher_side=side,
        sampled=not args.greedy_only,
    )
    write_text(side_file, json.dumps(side))
    return {**generations, "judge": judge_settings(args)}


def judge_settings(args) -> dict:
    return {
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "seed": args.judge_seed,
        "sampled": not args.greedy_only,
    }


def evaluate(ctx, student, args) -> dict:
    from distill.eval.quality import compare_on_held_out

    student.eval()
    quality = compare_on_held_out(
        student, ctx.teacher, ctx.held_out, max_sequences=args.held_out, batch_size=4
    )
    return {
        "perplexity_ratio": quality["student"]["perplexity"] / quality["teacher"]["perplexity"],
        "kl": quality["student"]["kl_to_teacher"],
        "top1": quality["student"]["top1_agreement"],
        "generation": judge(ctx, student, args),
    }


def rejudge(args, out: Path, trained: dict, names: list[str]) -> dict:
    """Every trained arm's final weights judged again with this run's judge settings (results in a folder of
    their own; the training records are kept)."""
    import copy

    from distill.stages import load_final

    greedy = "-greedy" if args.greedy_only else ""
    folder = out / f"judged-{args.prompts}x{args.new_tokens}-seed{args.judge_seed}{greedy}"
    folder.mkdir(exist_ok=True)
    results = {}
    for path in sorted(folder.glob("results-*.json")):  # one file an arm: arms may be judged side by side
        results.update(json.loads(path.read_text()))
    ctx = base = None  # loaded for the first arm that needs judging
    for name in [name for name in trained if name in names and name not in results]:
        record = trained[name]
        generation = record["generation"]
        if generation.get("judge") != judge_settings(args):  # not judged so when it was trained
            if ctx is None:
                ctx, base, _ = setup(out, float(args.layerwise_tokens), args.base)
            student = base
            if "folder" in record or ARMS.get(name) is not None:
                stage = Path(record.get("folder") or arm_dir(out, name) / f"stage1-{ARMS[name]['name']}")
                student = load_final(copy.deepcopy(base), stage)
            generation = judge(ctx, student, args)
        results[name] = {**record, "generation": generation}
        results["_setup"] = {**trained["_setup"], "prompts": args.prompts, "new_tokens": args.new_tokens}
        record = {"_setup": results["_setup"], name: results[name]}
        write_text(folder / f"results-{list(trained).index(name)}.json", json.dumps(record, indent=2))
        print(name, f"judged ({cpu():.0f} CPU s since the start)", flush=True)
    return results


def probe_dpo(args, out: Path) -> None:
    """DPO's learning rate checked at the comparison's budget, from the arm --after names: for each of
    --probe-dpo's rates, one pass over the pairs of the arm's training prompts (the first max_pairs) at that
    constant rate, and every 4 steps the mean sigmoid loss (log 2 = 0.693 at the reference), the reward margin
    beta * ((pi_c - ref_c) - (pi_r - ref_r)) and the share of pairs it ranks right, on the pairs of the next
    16 training prompts, which the stage never trains on."""
    import copy

    import torch

    from distill.generation import exchanges, padding_id
    from distill.losses import dpo_loss
    from distill.pairs import teacher_vs_student
    from distill.recipe import recipe_from_dict
    from distill.stages import load_final
    from distill.stages.dpo import answer_logprobs, pair_rows, reference_logprobs
    from distill.trainer import batches, set_trainable

    ctx, base, _ = setup(out, float(args.layerwise_tokens), args.base)
    before = list(ARMS)[args.after]
    start = load_final(copy.deepcopy(base), arm_dir(out, before) / f"stage1-{ARMS[before]['name']}")
    stage = {k: v for k, v in ARMS[DPO_ARM].items() if k != "after"}
    cfg = recipe_from_dict({"stages": [{**stage, "max_tokens": 1}]}).stages[0]
    found = exchanges(ctx.train, cfg.max_prompt_tokens)
    pad, device = padding_id(ctx.teacher, ctx.tokenizer), ctx.accelerator.device
    sets = {}
    for split, prompts in (("train", found[: cfg.max_pairs]), ("held_out", found[cfg.max_pairs :][:16])):
        with ctx.accelerator.autocast():
            pairs = teacher_vs_student(
                ctx.teacher,
                start,
                prompts,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.sample_temperature,
                seed=ctx.recipe.seed + 1,  # the arm's: run_stage seeds stage 1 with recipe.seed + 1
                pad_id=pad,
                batch_size=cfg.batch_size,
            )
        rows = pair_rows(pairs, cfg.max_length, pad)
        sets[split] = (rows, reference_logprobs(ctx, cfg, start, rows))

    def pair_loss(student, batch, reference):
        with ctx.accelerator.autocast():
            policy = answer_logprobs(student, batch).float()
        ref = reference[batch["row"].cpu()]
        margin = cfg.beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], cfg.beta), margin

    @torch.no_grad()
    def held_out(student) -> dict:
        rows, reference = sets["held_out"]
        losses, margins = zip(
            *(pair_loss(student, b, reference) for b in batches(rows, cfg.batch_size, device))
        )
        margin = torch.cat(margins)
        return {
            "loss": float(torch.cat(losses).mean()),
            "margin": float(margin.mean()),
            "right": float((margin > 0).float().mean()),
        }

    log = []
    for lr in args.probe_dpo:
        student = copy.deepcopy(start)
        set_trainable(student, cfg.trainable)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        rows, reference = sets["train"]
        started = cpu()
        for step, batch in enumerate(batches(rows, cfg.batch_size, device), 1):
            student.train()
            loss, _ = pair_loss(student, batch, reference)
            loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            if step % 4 == 0 or step * cfg.batch_size >= len(rows):
                student.eval()
                entry = {
                    "lr": lr,
                    "step": step,
                    "train_loss": float(loss.mean()),
                    "cpu_s": cpu() - started,
                    "held_out": held_out(student),
                }
                log.append(entry)
                print(json.dumps(entry), flush=True)
    at_reference = held_out(start)
    write_text(
        out / "probe-dpo.json", json.dumps({"held_out_at_reference": at_reference, "steps": log}, indent=2)
    )
    print("held-out pairs at the reference:", json.dumps(at_reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/post-training")
    parser.add_argument("--cpu-seconds", type=float, default=240.0, help="CPU seconds of each arm's stage")
    parser.add_argument("--layerwise-tokens", default="1e5")
    parser.add_argument(
        "--arm", type=int, choices=range(len(ARMS)), help="run only this arm (its index in ARMS)"
    )
    parser.add_argument(
        "--base",
        help="a finished run folder (recipe.yaml; OUT/base/stage0-layerwise holds a copy "
        "of its layerwise stage) to start from instead of training the base",
    )
    parser.add_argument(
        "--teacher-prompts", type=int, default=160, help="prompts the teacher answers (sft, seqkd, mixed)"
    )
    parser.add_argument(
        "--held-out", type=int, default=32, help="held-out rows for the teacher-forced metrics"
    )
    parser.add_argument(
        "--prompts", type=int, default=24, help="held-out prompts the generations are judged on"
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per judged answer")
    parser.add_argument("--judge-seed", type=int, default=0, help="the judge's sampling seed")
    parser.add_argument("--greedy-only", action="store_true", help="judge the greedy answers only")
    parser.add_argument("--tokens", type=float, help="the arm's token budget (instead of --cpu-seconds)")
    parser.add_argument(
        "--lr", type=float, help="the arm's learning rate instead of its own (recorded; use another --out)"
    )
    parser.add_argument(
        "--after",
        type=int,
        choices=[i for i, stage in enumerate(ARMS.values()) if stage and not stage.get("after")],
        help="the arm (dpo always; with --arm, any other too) starts from this arm's result",
    )
    parser.add_argument(
        "--probe-dpo", type=float, nargs="+", help="probe the dpo arm's learning rates (no arm trained)"
    )
    parser.add_argument("--plot", help="write the arms' plot (png) here from the result files")
    parser.add_argument(
        "--rejudge",
        action="store_true",
        help="judge every trained arm again with these --prompts/--new-tokens/--judge-seed (no training); "
        "results in OUT/judged-PxT-seedS[-greedy]",
    )
    args = parser.parse_args()
    if args.probe_dpo and args.after is None:
        parser.error("--probe-dpo needs --after ARM (the arm DPO starts from)")
    if args.arm is not None and (ARMS[list(ARMS)[args.arm]] or {}).get("after") and args.after is None:
        parser.error(f"--arm {args.arm} (dpo) needs --after ARM (the arm it starts from)")
    if args.arm is not None and args.arm == args.after:
        parser.error(f"--after {args.after}: an arm cannot start from its own result")
    base_done = Path(args.out) / "base" / "stage0-layerwise" / "summary.json"
    if args.base and not base_done.is_file():  # else arms wait for it forever, or arm 0 trains it anew
        parser.error(
            f"--base: copy its layerwise stage first: mkdir -p {args.out}/base && "
            f"cp -r {args.base}/stage0-layerwise {args.out}/base/"
        )
    import datasets
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.probe_dpo:
        probe_dpo(args, out)
        return
    results = {}
    for path in sorted(out.glob("results-*.json")):
        results.update(json.loads(path.read_text()))
    names = list(ARMS) if args.arm is None else [list(ARMS)[args.arm]]
    names = [n for n in names if not ARMS[n] or not ARMS[n].get("after") or args.after is not None]
    if args.after is not None:  # dpo in a full run; the one arm of --arm
        after = f" after {list(ARMS)[args.after]}"
        follows = [bool(ARMS[n]) and (ARMS[n].get("after") or args.arm is not None) for n in names]
        names = [n + after if follow else n for n, follow in zip(names, follows, strict=True)]
    for name in names:  # results are keyed by arm: a finished arm at another lr would be skipped silently
        if args.lr is not None and name in results and results[name].get("lr") != args.lr:
            parser.error(f"{out} already has {name!r} at another learning rate: pass --lr with another --out")
    if args.rejudge:
        if args.arm is None:
            names = [name for name in results if not name.startswith("_")]
        results = rejudge(args, out, results, names)
    if args.plot:
        plot(results, Path(args.plot))
    if all(name in results for name in names):
        print(table(results))
        return
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
    from distill.generation import padding_id

    data_rows, pad_id = ctx.train, padding_id(ctx.teacher, ctx.tokenizer)  # as the pipeline pads
    for name in names:
        stage = ARMS[name.split(" after ")[0]]
        if name in results:
            continue
        start = base
        if " after " in name:
            import copy

            from distill.stages import load_final

            before = list(ARMS)[args.after]
            start = load_final(copy.deepcopy(base), arm_dir(out, before) / f"stage1-{ARMS[before]['name']}")
        record: dict = {}
        if stage and args.lr:
            stage = {**stage, "lr": args.lr}
            record["lr"] = args.lr
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
                answers = teacher_answer_rows(few, ctx.teacher, data_cfg, ctx.recipe.seed, pad_id)
                record["teacher_answers_cpu_s"] = cpu() - started
                record["teacher_answer_rows"] = len(answers)
                ctx.train = answers
                if stage["teacher_answers"] == "mixed":
                    data = data_rows.select(range(len(answers))).cast(answers.features)
                    ctx.train = datasets.interleave_datasets([answers, data])
            if args.tokens:
                budget = args.tokens
            else:
                probe_dir = out / "probe" / name.split()[0]
                shutil.rmtree(probe_dir, ignore_errors=True)
                probe_tokens = 2000 if stage["name"] != "on_policy" else 4 * 64 * 3
                _, probe_cpu = train_arm(ctx, start, probe_dir, stage, probe_tokens)
                budget = probe_tokens * args.cpu_seconds / probe_cpu
            folder = arm_dir(out, name)
            if " after " in name:
                folder = folder.with_name(f"{folder.name}-after-{args.after}")
            started_wall = time.time()
            student, stage_cpu = train_arm(ctx, start, folder, stage, budget)
            record.update(tokens=int(budget), stage_cpu_s=stage_cpu, stage_wall_s=time.time() - started_wall)
            record["folder"] = str(folder / f"stage1-{stage['name']}")
            ctx.train = data_rows  # the judge leaves out every training prompt, not only the sft arm's
        record.update(evaluate(ctx, student, args))
        results[name] = record
        setup_info = {"_setup": results["_setup"]}
        tag = f"{list(ARMS).index(name.split(' after ')[0])}" + (
            f"-after{args.after}" if " after " in name else ""
        )
        # atomically: the other arms' processes read every results-*.json when they start
        write_text(out / f"results-{tag}.json", json.dumps({**setup_info, name: record}, indent=2))
        print(name, json.dumps({k: v for k, v in record.items() if k != "generation"}), flush=True)
    print(table(results))


REFERENCE_ARM = "end_to_end (forward KL, fixed data)"


def draws(generation: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Bootstrap draws over the judged prompts (resampled with replacement, the teacher's and the student's
    answers to a prompt kept together) of the greedy and sampled perplexity ratios and the shared prefix. The
    same seed draws the same prompts for every arm, so two arms' draws also give a paired spread."""
    import numpy as np

    rng = np.random.default_rng(seed)
    per = generation["per_prompt"]
    picks = rng.integers(0, generation["prompts"], size=(resamples, generation["prompts"]))
    out = {}
    for mode in ("greedy", "sampled")[: 2 if "student_sampled" in per else 1]:
        s, t = per[f"student_{mode}"], per[f"teacher_{mode}"]
        nll_s, tok_s = np.asarray(s["nll"])[picks].sum(1), np.asarray(s["tokens"])[picks].sum(1)
        nll_t, tok_t = np.asarray(t["nll"])[picks].sum(1), np.asarray(t["tokens"])[picks].sum(1)
        out[mode] = np.exp(nll_s / np.maximum(tok_s, 1) - nll_t / np.maximum(tok_t, 1))
    out["shared_prefix"] = np.asarray(per["shared_prefix"])[picks].mean(1)
    return out


def interval(values) -> tuple[float, float]:
    import numpy as np

    low, high = np.percentile(values, [5, 95])
    return float(low), float(high)


def spread(generation: dict) -> dict:
    """5-95% bootstrap intervals: how much of a difference between two arms the number of prompts resolves."""
    return {key: interval(values) for key, values in draws(generation).items()}


def paired(generation: dict, reference: dict) -> dict:
    """5-95% bootstrap intervals of the greedy ratio's excess over 1 relative to the reference arm's
    ((r - 1) / (r_ref - 1)) and of the shared prefix's difference, on the same resampled prompts."""
    arm, ref = draws(generation), draws(reference)
    return {
        "excess": interval((arm["greedy"] - 1) / (ref["greedy"] - 1)),
        "prefix": interval(arm["shared_prefix"] - ref["shared_prefix"]),
    }


def arms_in_order(results: dict) -> list[str]:
    return [name for name in results if not name.startswith("_")]


def cell(value: float, band: dict | None, key: str, digits: int) -> str:
    if band is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{band[key][0]:.{digits}f}-{band[key][1]:.{digits}f}]"


def versus(generation: dict, reference: dict | None) -> str:
    if reference is None or "per_prompt" not in generation or "per_prompt" not in reference:
        return "- | -"
    if generation.get("judge") != reference.get("judge"):  # other prompts: no pairing
        return "- | -"
    ref = reference["greedy"]
    excess = (generation["greedy"]["perplexity_ratio"] - 1) / (ref["perplexity_ratio"] - 1)
    prefix = generation["greedy"]["shared_prefix"] - ref["shared_prefix"]
    band = paired(generation, reference)
    return (
        f"{excess:.2f} [{band['excess'][0]:.2f}-{band['excess'][1]:.2f}] "
        f"| {prefix:+.1f} [{band['prefix'][0]:+.1f}-{band['prefix'][1]:+.1f}]"
    )


def table(results: dict) -> str:
    lines = [
        (
            "| arm | tokens | stage CPU s | held-out ppl ratio | KL | top-1 "
            "| gen. ppl ratio greedy [5-95%] | sampled [5-95%] | shared greedy prefix [5-95%] "
            "| greedy excess / end_to_end's [5-95%] | prefix - end_to_end's [5-95%] |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = results.get(REFERENCE_ARM, {}).get("generation")
    for name in arms_in_order(results):
        r = results[name]
        g = r["generation"]
        extra = (
            f" (+{r['teacher_answers_cpu_s']:.0f} teacher answers)" if "teacher_answers_cpu_s" in r else ""
        )
        if " after " in name:
            extra += " (+ the arm before)"
        label = name + (f" (lr {r['lr']:g})" if "lr" in r else "")
        band = spread(g) if "per_prompt" in g else None
        lines.append(
            f"| {label} | {r.get('tokens', '-')} | {r['stage_cpu_s']:.0f}{extra} "
            f"| {r['perplexity_ratio']:.3f} | {r['kl']:.3f} | {r['top1']:.3f} "
            f"| {cell(g['greedy']['perplexity_ratio'], band, 'greedy', 3)} "
            f"| {cell(g['sampled']['perplexity_ratio'], band, 'sampled', 2) if 'sampled' in g else '-'} "
            f"| {cell(g['greedy']['shared_prefix'], band, 'shared_prefix', 1)} | {versus(g, reference)} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Each arm's generation metrics with their bootstrap intervals, and its teacher-forced ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = arms_in_order(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.5 * len(names) + 1.8), sharey=True)
    panels = (
        ("greedy", "generation ppl ratio, greedy (teacher-scored)"),
        ("shared_prefix", "greedy prefix shared with the teacher (tokens)"),
        (None, "held-out teacher-forced ppl ratio"),
    )
    for ax, (key, title) in zip(axes, panels):
        for y, name in enumerate(names):
            r = results[name]
            g = r["generation"]
            if key is None:
                ax.plot(r["perplexity_ratio"], y, "o", color="C0")
                continue
            value = g["greedy"]["perplexity_ratio"] if key == "greedy" else g["greedy"]["shared_prefix"]
            low, high = spread(g)[key]
            ax.errorbar(value, y, xerr=[[value - low], [high - value]], fmt="o", color="C0", capsize=3)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    setup = results.get("_setup", {})
    fig.suptitle(
        f"after the demo's layerwise stage, one more stage at equal CPU time; "
        f"{setup.get('prompts')} held-out prompts x {setup.get('new_tokens')} tokens "
        "(bars: 5-95% bootstrap over prompts)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # a bad --base recipe: one line, as the distill CLI prints it
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
