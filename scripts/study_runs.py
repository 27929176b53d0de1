"""The study's runner and collector: run an arm (`distill run` in its own folder), then gather every finished
arm's numbers (held-out quality, lm-eval, decode speed, loss curves, cost) into the results table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from study_arms import ARMS, BASE, ROOT, SHARED_FIRST_STAGE, arm_overrides

from distill.layout import RunLayout, finished_summary


def run_arm(name: str, out: Path, scale: float, threads: int, align_scale: float | None = None) -> dict:
    report = out / name / "eval" / "report.json"
    if report.is_file():
        return {"arm": name, "status": "skipped (finished)"}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "distill", "run", str(BASE)]
    for item in arm_overrides(name, out, scale, align_scale):
        cmd += ["--set", item]
    (out / name).mkdir(parents=True, exist_ok=True)
    if name in SHARED_FIRST_STAGE:
        source = SHARED_FIRST_STAGE[name]
        shared = RunLayout(out / source).stage(0, "layerwise")
        if not finished_summary(shared):
            status = f"waiting: needs {source}'s layerwise stage; rerun when it has finished"
            return {"arm": name, "status": status}
        link = RunLayout(out / name).stage(0, "layerwise")
        if not link.exists():
            link.symlink_to(Path("..") / source / shared.name)
    (out / name / "threads").write_text(str(threads))
    started = time.time()
    with open(out / name / "study.log", "a") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return {"arm": name, "status": "ok" if code == 0 else f"failed (exit {code})",
            "wall_time_s": round(time.time() - started)}


def lm_eval_scores(final: Path, limit: int | None) -> dict:
    """lm-eval's stock `hf` model on the shipped local tasks, cached next to the arm's report."""
    from distill.eval.lm_eval_runner import LOCAL_TASKS, run_lm_eval, summarize

    cache = final.parent / "eval" / f"lm_eval_limit{limit}.json"
    if not cache.is_file():
        cache.write_text(json.dumps(summarize(run_lm_eval(str(final), LOCAL_TASKS, limit=limit)["results"])))
    return json.loads(cache.read_text())


def decode_speed(arms: list[str], out: Path, contexts: list[int]) -> dict[str, dict]:
    """Decode tok/s at each context for each architecture (fresh weights; speed is weight-independent).

    One thread, so the step times are this thread's CPU time, unaffected by other jobs on the machine."""
    import torch

    from distill.eval.speed import benchmark
    from distill.init import hybrid_from_teacher
    from distill.recipe import StudentConfig, TeacherConfig
    from distill.teacher import load_teacher

    torch.set_num_threads(1)
    teacher, _ = load_teacher(TeacherConfig(), dtype=torch.float32)
    models, arch_of = {"teacher": teacher}, {}
    for name in arms:
        student = yaml.safe_load((out / name / "recipe.yaml").read_text())["student"]
        layers = student["attention_layers"]  # a list when chosen from data: its count sets the speed
        fraction = (len(layers) / teacher.config.num_hidden_layers if isinstance(layers, list)
                    else student["attention_fraction"] or 0)
        d_state = student.get("mamba2_d_state")  # a wider Mamba-2 state decodes slower
        arch = f"{student['mixer']}@{fraction}" + (f"-state{d_state}" if d_state else "")
        arch_of[name] = arch
        if arch not in models:
            # speed does not depend on the weights
            cfg = StudentConfig(mixer=student["mixer"], attention_layers="uniform",
                                attention_fraction=fraction, norm_init="ones", mamba2_d_state=d_state)
            models[arch] = hybrid_from_teacher(teacher, cfg, seed=0).eval()
    rows = benchmark(models, contexts, [1], steps=4, prefill_max_tokens=0)
    by_arch = {}
    for row in rows:
        by_arch.setdefault(row["model"], {})[str(row["context"])] = {  # str: the keys results.json keeps
            "decode_tok_s": row["decode_tok_s"], "speedup_vs_teacher": row["decode_speedup"]}
    return {name: by_arch[arch] for name, arch in arch_of.items()} | {"teacher": by_arch["teacher"]}


def loss_curve(stage_dir: Path) -> list[tuple[int, float]]:
    """(tokens, training loss) per optimizer step of one stage, from its metrics.jsonl."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(row["tokens"], row["loss"]) for row in rows if "loss" in row]


def load_table(path: Path) -> dict:
    """The persisted results table (`docs/results.json`): every arm's row as the last collection left it."""
    return json.loads(path.read_text()) if path.is_file() else {"arms": {}}


def save_table(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2))


def collect(out: Path, arms: list[str], lm_eval_limit: int | None, speed_contexts: list[int], threads: int,
            table: dict) -> dict:
    """The new results table: a row for every finished arm under `out`; an arm whose outputs are not there
    (run on another machine) keeps its row from the persisted `table`, marked `kept: true`, so the report
    always covers the whole study."""
    results = {"arms": {}}
    finished = [name for name in arms if (out / name / "eval" / "report.json").is_file()]
    results |= {key: table[key] for key in ("teacher", "teacher_decode") if key in table}
    results["arms"] = {name: {**arm, "kept": True} for name, arm in table.get("arms", {}).items()
                       if name in arms and name not in finished}
    for name in finished:
        report = json.loads((out / name / "eval" / "report.json").read_text())
        teacher, student = report["teacher"], report["student"]
        recipe = yaml.safe_load((out / name / "recipe.yaml").read_text())
        wall = sum(stage.get("wall_time_s", 0) for stage in report["stages"])
        threads_file = out / name / "threads"
        arm_threads = int(threads_file.read_text()) if threads_file.is_file() else threads
        stage_tokens = {stage["name"]: stage.get("tokens", 0) for stage in report["stages"]}
        stage_wall = {stage["name"]: stage.get("wall_time_s", 0) for stage in report["stages"]}
        fraction = recipe["student"]["attention_fraction"]
        selection = report.get("selection")
        if selection:  # its alignment and scoring count in full, even when another arm paid for them first
            stage_tokens = {"selection": selection["align_tokens"], **stage_tokens}
            stage_wall = {"selection": selection["align_seconds"] + selection["score_seconds"], **stage_wall}
            wall += stage_wall["selection"]
            fraction = selection["fraction"]
        results["teacher"] = teacher
        results["arms"][name] = {
            "comparison": ARMS[name][0],
            "mixer": recipe["student"]["mixer"],
            "attention_fraction": fraction,
            "attention_layers": selection["attention_layers"] if selection else None,
            "perplexity": student["perplexity"],
            "perplexity_ratio": student["perplexity"] / teacher["perplexity"],
            "kl_to_teacher": student["kl_to_teacher"],
            "top1_agreement": student["top1_agreement"],
            "stage_tokens": stage_tokens,
            "stage_wall_s": stage_wall,
            "tokens": sum(stage_tokens.values()),
            "wall_time_s": wall,
            "threads": arm_threads,
            "cpu_hours": wall * arm_threads / 3600,
            "lm_eval": lm_eval_scores(out / name / "final", lm_eval_limit),
            "curves": {stage["name"]: loss_curve(RunLayout(out / name).stage(stage["index"], stage["name"]))
                       for stage in report["stages"]},
        }
    if finished and speed_contexts:
        speed = decode_speed(finished, out, speed_contexts)
        results["teacher_decode"] = speed.pop("teacher")
        for name, by_context in speed.items():
            results["arms"][name]["decode"] = by_context
    results["arms"] = {name: results["arms"][name] for name in arms if name in results["arms"]}  # ARMS order
    return results
