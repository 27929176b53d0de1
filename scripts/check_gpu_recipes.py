"""Run each GPU recipe at its teacher's real shapes for a few steps on CPU, and report peak memory per phase.

No hub here, so each teacher is built with random weights from its public config (recipes/teachers.json)
through transformers' own config class, at the published width (hidden size, heads, GQA, head_dim, vocabulary,
RoPE scaling, tied or untied embeddings) and --layers layers (default: the published count; fewer keeps every
shape but the depth, which memory scales with linearly, so a 7-8B teacher fits a small machine). The recipe
then runs as written, through selection, each stage, eval and export, at its own sequence length, with only
budgets changed by `--set`: a few steps per phase at batch 1, the built-in ShareGPT data (the recipes' hub
datasets are out of reach), the built-in SmolLM2 tokenizer (cut to its first 32768 ids for Mistral's
vocabulary), no lm-eval tasks, no speed benchmark, no trackers.

Each recipe runs in its own process. Peak memory is the process's resident peak (VmHWM, reset through
/proc/self/clear_refs at the start of each phase): on CPU the weights, optimizer states and activations all
live there, so it bounds what one GPU process needs for the same recipe at batch 1 (a GPU run holds the
activations of its own batch size instead).

    python scripts/check_gpu_recipes.py recipes/llama-3.2-1b/hybrid50-mamba2.yaml --layers 2
    python scripts/check_gpu_recipes.py --all --layers 2 --json docs/gpu-recipes.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = json.loads((ROOT / "recipes" / "teachers.json").read_text())
ACTIVE: list = []  # the measured call in progress, if any
SWAPPED = {"total": 0, "swap": 0}  # the largest resident + swapped and swapped bytes sampled in this phase


def teacher_config(name: str, layers: int | None):
    """The teacher's config from its public values, through transformers' config class, at `layers` layers."""
    from transformers import AutoConfig

    public = dict(TEACHERS[name]["config"])
    if layers:
        public["num_hidden_layers"] = layers
        if "no_rope_layers" in public:  # SmolLM3: the same every-4th-layer pattern, shortened
            public["no_rope_layers"] = public["no_rope_layers"][:layers]
        if "max_window_layers" in public:
            public["max_window_layers"] = min(public["max_window_layers"], layers)
    return AutoConfig.for_model(public.pop("model_type"), **public)


def build_teacher(name: str, layers: int | None, folder: Path) -> float:
    """A random-weight bf16 teacher and the built-in tokenizer in `folder`; returns its size in billions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.recipe import TeacherConfig
    from distill.teacher import BUILTIN_TEACHER, load_teacher

    config = teacher_config(name, layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    _, builtin_tokenizer = load_teacher(TeacherConfig(source=BUILTIN_TEACHER), torch.float32)
    model.save_pretrained(folder)
    builtin_tokenizer.save_pretrained(folder)
    if len(builtin_tokenizer) > config.vocab_size:
        cut_vocabulary(folder / "tokenizer.json", config.vocab_size)
    assert len(AutoTokenizer.from_pretrained(folder)) <= config.vocab_size  # loads back, and its ids fit
    return sum(p.numel() for p in model.parameters()) / 1e9


def cut_vocabulary(path: Path, size: int) -> None:
    """Keep a BPE tokenizer's first `size` ids (Mistral's 32768 of SmolLM2's 49152): drop the later tokens and
    every merge that needs or makes one, so the ids fit the teacher's embedding (a coarser tokenization of the
    same text, which is all a shape check needs)."""
    tokenizer = json.loads(path.read_text())
    vocab = {token: i for token, i in tokenizer["model"]["vocab"].items() if i < size}
    tokenizer["model"]["vocab"] = vocab
    tokenizer["model"]["merges"] = [pair for pair in tokenizer["model"]["merges"]
                                    if pair[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab]
    if any(added["id"] >= size for added in tokenizer["added_tokens"]):
        raise SystemExit(f"{path}: special tokens beyond id {size}")
    path.write_text(json.dumps(tokenizer, ensure_ascii=False))


def budget_overrides(recipe_path: Path, teacher_dir: Path, out: Path, steps: int) -> list[str]:
    """--set overrides: the local teacher, built-in data, `steps` steps at batch 1 per phase, a small eval."""
    import yaml

    raw = yaml.safe_load(recipe_path.read_text())
    max_length = (raw.get("data") or {}).get("max_length", 512)
    tokens = f"{steps * max_length}"
    sets = [f"teacher.source={teacher_dir}", "data.source=sharegpt", "data.split=train",
            "data.held_out_size=2", "data.max_conversations=400", f"output_dir={out}", "logging.wandb=false",
            "eval.max_sequences=2", "eval.batch_size=1", "eval.lm_eval_tasks=[]", "eval.speed=false",
            "eval.needle=false"]
    phases = [f"stages.{i}" for i in range(len(raw.get("stages") or []))]
    if raw.get("selection") is not None:
        phases.append("selection.align")
        sets += ["selection.score_rows=1", f"selection.cache_dir={out / 'aligned'}"]
    for phase in phases:
        sets += [f"{phase}.max_tokens={tokens}", f"{phase}.batch_size=1", f"{phase}.grad_accum=1",
                 f"{phase}.checkpoint_every_tokens={tokens}", f"{phase}.held_out_rows=1"]
    return sets


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    SWAPPED.update(total=0, swap=0)


def sample_swap(every: float = 0.5) -> None:
    """Forever: VmRSS + VmSwap every `every` s into SWAPPED. VmHWM counts only resident pages, so where the
    machine swaps it is short of what the phase needs; resident + swapped is that need (sampled, so a peak
    shorter than the interval can be missed)."""
    while True:
        with open("/proc/self/status") as f:
            kb = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                  if line.startswith(("VmRSS", "VmSwap"))}
        rss, swap = kb["VmRSS"], kb.get("VmSwap", 0)
        SWAPPED.update(total=max(SWAPPED["total"], rss + swap), swap=max(SWAPPED["swap"], swap))
        time.sleep(every)


def measured(phases: list, label, fn):
    """fn wrapped so that each call's peak resident memory and wall time are appended to `phases` (a call made
    inside another measured one, such as the selection's own stage, counts as part of the outer one)."""

    def wrapper(*args, **kwargs):
        if ACTIVE:
            return fn(*args, **kwargs)
        ACTIVE.append(fn)
        reset_peak()
        start = time.time()
        try:
            result = fn(*args, **kwargs)
        finally:
            ACTIVE.pop()
        name = label(*args, **kwargs) if callable(label) else label
        seconds = round(time.time() - start)
        phases.append({"phase": name, "peak_gb": round(peak_rss() / 1e9, 2), "seconds": seconds})
        if SWAPPED["swap"]:  # some of it was swapped out: what it needed is more than the resident peak
            phases[-1].update(swap_gb=round(SWAPPED["swap"] / 1e9, 2),
                              peak_with_swap_gb=round(max(SWAPPED["total"], peak_rss()) / 1e9, 2))
        print("PHASE " + json.dumps(phases[-1]), flush=True)  # as it happens: a long run shows its progress
        return result

    return wrapper


def run_one(recipe_path: Path, layers: int | None, steps: int, workdir: Path, extra: list[str]) -> dict:
    """In this process: build the teacher, run the recipe with budgets, return the per-phase peaks."""
    import distill.eval.evaluation
    import distill.export
    import distill.run
    import distill.selection
    import distill.stages

    name = recipe_path.parent.name
    threading.Thread(target=sample_swap, daemon=True).start()
    billions = build_teacher(name, layers, workdir / "teacher")
    phases: list[dict] = []
    distill.stages.run_stage = measured(phases, lambda ctx, index, cfg, student: f"stage {index}: {cfg.name}",
                                        distill.stages.run_stage)
    distill.selection.prepare_student = measured(phases, "selection", distill.selection.prepare_student)
    distill.eval.evaluation.evaluate = measured(phases, "eval", distill.eval.evaluation.evaluate)
    distill.export.export = measured(phases, lambda checkpoint, fmt, *a, **k: f"export {fmt}",
                                     distill.export.export)
    started = time.time()
    sets = budget_overrides(recipe_path, workdir / "teacher", workdir / "out", steps) + extra
    distill.run.main([str(recipe_path), *(arg for item in sets for arg in ("--set", item))])
    return {"recipe": str(recipe_path.relative_to(ROOT)),
            "layers": teacher_config(name, layers).num_hidden_layers, "steps": steps, "sets": extra,
            "teacher_billions": round(billions, 3),
            "phases": phases, "seconds": round(time.time() - started)}


def table(results: list[dict]) -> str:
    lines = ["| recipe | layers | teacher params (B) | phase | peak RSS (GB) | GB per B teacher params | s |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        for phase in result["phases"]:
            per_billion = phase["peak_gb"] / result["teacher_billions"]
            lines.append(f"| {result['recipe']} | {result['layers']} | {result['teacher_billions']:.2f} | "
                         f"{phase['phase']} | {phase['peak_gb']:.1f} | {per_billion:.1f} | "
                         f"{phase['seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path)
    parser.add_argument("--all", action="store_true", help="every recipe of the teachers in teachers.json")
    parser.add_argument("--layers", type=int, default=None, help="teacher layers (default: published)")
    parser.add_argument("--steps", type=int, default=1,
                        help="optimizer steps per phase (1: the first step allocates the optimizer states)")
    parser.add_argument("--json", type=Path, default=None, help="add each recipe's result to this JSON list")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="one more recipe override after the budgets, e.g. precision=fp32 on a CPU "
                             "without fast bf16 matmuls (repeatable)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the per-recipe child process
    args = parser.parse_args(argv)
    recipes = [p.resolve() for p in args.recipes]
    if args.all:
        recipes = sorted(p for name in TEACHERS for p in (ROOT / "recipes" / name).glob("*.yaml"))
    if args.one:
        with tempfile.TemporaryDirectory(prefix="gpu-recipe-") as tmp:
            result = run_one(recipes[0], args.layers, args.steps, Path(tmp), args.sets)
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    results, failed = [], []
    for recipe in recipes:
        command = [sys.executable, __file__, "--one", str(recipe)]
        command += ["--layers", str(args.layers)] if args.layers else []
        command += ["--steps", str(args.steps)] + [arg for item in args.sets for arg in ("--set", item)]
        lines = []
        # the child's stderr (the run's log) passes through; its stdout carries the phases and the result
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
            for line in child.stdout:
                lines.append(line)
                if line.startswith("PHASE "):
                    print(f"{recipe.relative_to(ROOT)}: {line.removeprefix('PHASE ').strip()}", flush=True)
        lines = [line for line in lines if line.startswith("RESULT ")]
        if child.returncode or not lines:
            failed.append(recipe)
            print(f"FAILED {recipe.relative_to(ROOT)} (its log is above)", flush=True)
            continue
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(table(results[-1:]), flush=True)
        if args.json:
            kept = json.loads(args.json.read_text()) if args.json.is_file() else []
            key = (results[-1]["recipe"], results[-1]["layers"])
            kept = [r for r in kept if (r["recipe"], r["layers"]) != key]
            args.json.write_text(json.dumps([*kept, results[-1]], indent=1) + "\n")
    if len(results) > 1:
        print(table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
