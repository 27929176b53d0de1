"""The CPU-scale reproduction study (issue 8): every arm on the same data, seed and held-out split.

    python scripts/study.py                      # run every arm, then write docs/results.{md,json} + plots
    python scripts/study.py --jobs 2 --threads 1 # two arms at a time, one core each
    python scripts/study.py --scale 0.1 --out outputs/study-smoke --docs outputs/study-smoke/docs
    python scripts/study.py --plan               # print the arms and their budgets, run nothing

Each arm is the base recipe (`recipes/smollm2-135m/study/base.yaml`) plus `--set` overrides, run with
`distill run` in its own output folder. A finished arm (its `eval/report.json` exists) is skipped, and a
killed arm resumes from its newest checkpoint, so rerunning the same command continues the study.
After the runs, each arm's final checkpoint is scored with lm-eval's stock `hf` model on the shipped
local tasks, and decode speed is measured once per architecture (it does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "recipes/smollm2-135m/study/base.yaml"

# The base arm trains layerwise for LAYERWISE tokens, then end-to-end for E2E tokens.
LAYERWISE, E2E = 3e5, 4e4
IMPROVED_INIT = ["student.norm_init=rms_ratio", "student.conv_init=identity"]

# name -> (the comparison it belongs to, its --set overrides on top of the base arm)
ARMS: dict[str, tuple[str, list[str]]] = {
    "attn50-mamba2": ("base", []),
    "attn50-mamba2-random-init": ("init", ["student.init=random"]),
    "attn50-mamba2-init-plus": ("init", IMPROVED_INIT),
    "attn50-mamba2-e2e-only": ("stages", ["stages=E2E_ONLY"]),
    "attn50-mamba2-stepwise": ("stages", ["stages.0.name=stepwise"]),
    "attn25-mamba2": ("fraction", ["student.attention_fraction=0.25"]),
    "attn12-mamba2": ("fraction", ["student.attention_fraction=0.125"]),
    "attn0-mamba2": ("fraction", ["student.attention_fraction=0.0"]),
    "attn50-mamba1": ("mixer", ["student.mixer=mamba1"]),
    "attn50-mamba2-reverse-kl": ("kl", ["stages.1.kl=reverse"]),
    "attn50-mamba2-jsd": ("kl", ["stages.1.kl=jsd"]),
    "attn50-mamba2-topk-logits": ("kl", ["stages.1.teacher_logits=topk"]),
}


def arm_overrides(name: str, out: Path, scale: float) -> list[str]:
    """The `--set` list of one arm: its own overrides plus its output folder and the scaled budgets."""
    _, overrides = ARMS[name]
    sets = [f"output_dir={out / name}"]
    if "stages=E2E_ONLY" in overrides:  # one end-to-end stage with the same total token budget
        base = yaml.safe_load(BASE.read_text())["stages"][1]
        base["max_tokens"] = int((LAYERWISE + E2E) * scale)
        sets.append("stages=" + json.dumps([base]))
        return sets
    sets += [f"stages.0.max_tokens={int(LAYERWISE * scale)}", f"stages.1.max_tokens={int(E2E * scale)}"]
    return sets + overrides


def run_arm(name: str, out: Path, scale: float, threads: int) -> dict:
    report = out / name / "eval" / "report.json"
    if report.is_file():
        return {"arm": name, "status": "skipped (finished)"}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "distill", "run", str(BASE)]
    for item in arm_overrides(name, out, scale):
        cmd += ["--set", item]
    (out / name).mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(out / name / "study.log", "a") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return {"arm": name, "status": "ok" if code == 0 else f"failed (exit {code})",
            "wall_time_s": round(time.time() - started)}


def lm_eval_scores(final: Path, limit: int | None) -> dict:
    from distill.eval.lm_eval_runner import LOCAL_TASKS, run_lm_eval, summarize

    return summarize(run_lm_eval(str(final), LOCAL_TASKS, limit=limit)["results"])


def decode_speed(arms: list[str], out: Path, contexts: list[int]) -> dict[str, dict]:
    """Decode tok/s at each context for each architecture (fresh weights; speed is weight-independent)."""
    import torch

    from distill.eval.speed import benchmark
    from distill.init import hybrid_from_teacher
    from distill.recipe import StudentConfig, TeacherConfig
    from distill.teacher import load_teacher

    teacher, _ = load_teacher(TeacherConfig(), dtype=torch.float32)
    models, arch_of = {"teacher": teacher}, {}
    for name in arms:
        student = yaml.safe_load((out / name / "recipe.yaml").read_text())["student"]
        arch = f"{student['mixer']}@{student['attention_fraction'] or 0}"
        arch_of[name] = arch
        if arch not in models:
            cfg = StudentConfig(mixer=student["mixer"], attention_fraction=student["attention_fraction"])
            models[arch] = hybrid_from_teacher(teacher, cfg, seed=0).eval()
    rows = benchmark(models, contexts, [1], steps=4, prefill_max_tokens=0)
    by_arch = {}
    for row in rows:
        by_arch.setdefault(row["model"], {})[row["context"]] = {
            "decode_tok_s": row["decode_tok_s"], "speedup_vs_teacher": row["decode_speedup"]}
    return {name: by_arch[arch] for name, arch in arch_of.items()} | {"teacher": by_arch["teacher"]}


def collect(out: Path, arms: list[str], lm_eval_limit: int | None, speed_contexts: list[int]) -> dict:
    results = {"arms": {}, "budget": {"layerwise_tokens": LAYERWISE, "end_to_end_tokens": E2E}}
    finished = [name for name in arms if (out / name / "eval" / "report.json").is_file()]
    for name in finished:
        report = json.loads((out / name / "eval" / "report.json").read_text())
        teacher, student = report["teacher"], report["student"]
        results["teacher"] = teacher
        results["arms"][name] = {
            "comparison": ARMS[name][0],
            "perplexity": student["perplexity"],
            "perplexity_ratio": student["perplexity"] / teacher["perplexity"],
            "kl_to_teacher": student["kl_to_teacher"],
            "top1_agreement": student["top1_agreement"],
            "tokens": sum(stage.get("tokens", 0) for stage in report["stages"]),
            "wall_time_s": sum(stage.get("wall_time_s", 0) for stage in report["stages"]),
            "stages": [stage.get("name") for stage in report["stages"]],
        }
        results["arms"][name]["lm_eval"] = lm_eval_scores(out / name / "final", lm_eval_limit)
    if finished and speed_contexts:
        speed = decode_speed(finished, out, speed_contexts)
        results["teacher_decode"] = speed.pop("teacher")
        for name, by_context in speed.items():
            results["arms"][name]["decode"] = by_context
    return results


def write_docs(results: dict, docs: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.json").write_text(json.dumps(results, indent=2))
    arms = results["arms"]
    contexts = sorted({c for arm in arms.values() for c in arm.get("decode", {})})
    head = "| arm | comparison | ppl ratio | KL | top-1 | lm-eval | " + "".join(
        f"decode@{c} (× teacher) | " for c in contexts) + "tokens | wall (min) |"
    lines = [
        "# CPU-scale reproduction study",
        "",
        (f"Produced by `{command}` (see scripts/study.py). Teacher: SmolLM2-135M-Instruct; data: ShareGPT; "
         "held-out perplexity on assistant tokens; KL = mean KL(teacher‖student) per loss token in nats."),
        "",
        f"Teacher perplexity: {results.get('teacher', {}).get('perplexity', float('nan')):.3f}",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for name, arm in arms.items():
        lm = "; ".join(f"{task}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
                       for task, metrics in arm.get("lm_eval", {}).items())
        decode = [f"{arm['decode'][c]['decode_tok_s']:.1f} ({arm['decode'][c]['speedup_vs_teacher']:.2f}×)"
                  if c in arm.get("decode", {}) else "" for c in contexts]
        lines.append(f"| {name} | {arm['comparison']} | {arm['perplexity_ratio']:.3f} | {arm['kl_to_teacher']:.3f} | "
                     f"{arm['top1_agreement']:.3f} | {lm} | " + "".join(f"{d} | " for d in decode) +
                     f"{arm['tokens']:,} | {arm['wall_time_s'] / 60:.0f} |")
    if arms:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(arms) + 1.5))
        names = list(arms)
        for ax, key, label in ((axes[0], "perplexity_ratio", "held-out perplexity / teacher's"),
                               (axes[1], "kl_to_teacher", "KL(teacher‖student), nats/token")):
            ax.barh(names, [arms[n][key] for n in names])
            ax.set_xlabel(label)
            ax.invert_yaxis()
        axes[0].axvline(1.0, color="k", lw=0.8)
        fig.tight_layout()
        fig.savefig(docs / "results.png", dpi=120)
        plt.close(fig)
        lines += ["", "![perplexity ratio and KL per arm](results.png)"]
    (docs / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every arm's token budget")
    parser.add_argument("--jobs", type=int, default=1, help="arms run at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per arm")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/study")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--lm-eval-limit", type=int, default=200)
    parser.add_argument("--speed-contexts", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--plan", action="store_true", help="print the arms and their overrides, run nothing")
    args = parser.parse_args()
    if args.plan:
        for name in args.arms:
            print(f"{name:30s} {ARMS[name][0]:9s} " + " ".join(arm_overrides(name, args.out, args.scale)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for status in pool.map(lambda name: run_arm(name, args.out, args.scale, args.threads), args.arms):
            print(json.dumps(status), flush=True)
    results = collect(args.out, args.arms, args.lm_eval_limit, args.speed_contexts)
    write_docs(results, args.docs, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    print(f"wrote {args.docs / 'results.md'}")


if __name__ == "__main__":
    main()
