"""The evaluation report: `report.json`, `report.md` (one teacher-vs-student table) and one PNG per idea.

`markdown_table(report)` is the table alone, for model cards.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator

MiB = 2**20


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


# ----------------------------------------------------------------------------- markdown


def _metric_rows(report: dict) -> list[tuple[str, object, object]]:
    teacher, student = report["teacher"], report["student"]
    rows = [
        ("held-out perplexity (loss tokens)", teacher["perplexity"], student["perplexity"]),
        ("KL(teacher || student) per token, nats", 0.0, student["kl_to_teacher"]),
        ("top-1 agreement with the teacher", 1.0, student["top1_agreement"]),
    ]
    for task, metrics in student.get("lm_eval", {}).items():
        for metric, value in metrics.items():
            rows.append(
                (f"lm-eval {task} {metric}", teacher.get("lm_eval", {}).get(task, {}).get(metric), value)
            )
    generations = report.get("generations") or {}
    for mode in ("greedy", "sampled"):
        if mode in generations:
            g = generations[mode]
            rows.append((f"teacher's NLL per token of the {mode} answers, nats", g["teacher_nll_of_teacher"],
                         g["teacher_nll_of_student"]))
            rows.append((f"generation perplexity ratio ({mode}, teacher-scored)", 1.0, g["perplexity_ratio"]))
    if "shared_prefix" in generations.get("greedy", {}):
        rows.append(("greedy answer's prefix shared with the teacher, tokens", None, generations["greedy"]["shared_prefix"]))
    if "needle_accuracy" in student:
        rows.append(
            (
                "passkey retrieval accuracy (all lengths/depths)",
                teacher["needle_accuracy"],
                student["needle_accuracy"],
            )
        )
    speed = {(r["model"], r["batch"], r["context"]): r for r in report.get("speed", [])}
    for (model, batch, context), row in speed.items():
        if model != "student":
            continue
        base = speed[("teacher", batch, context)]
        rows.append(
            (f"decode tok/s, batch {batch}, context {context}", base["decode_tok_s"], row["decode_tok_s"])
        )
        rows.append(
            (
                f"decode state MiB (KV + SSM), batch {batch}, context {context}",
                (base["kv_cache_bytes"] + base["ssm_state_bytes"]) / MiB,
                (row["kv_cache_bytes"] + row["ssm_state_bytes"]) / MiB,
            )
        )
    return rows


def markdown_table(report: dict) -> str:
    """Teacher vs student on every metric (held-out quality, lm-eval, passkey, speed, memory)."""
    lines = ["| metric | teacher | student |", "|---|---:|---:|"]
    lines += [f"| {name} | {_fmt(t)} | {_fmt(s)} |" for name, t, s in _metric_rows(report)]
    return "\n".join(lines)


def _stages_table(stages: list[dict]) -> str:
    lines = ["| # | stage | tokens | steps | wall time (s) | final loss |", "|---:|---|---:|---:|---:|---:|"]
    for index, stage in enumerate(stages):
        lines.append(
            f"| {index} | {stage.get('name', '?')} | {_fmt(stage.get('tokens'))} | "
            f"{_fmt(stage.get('steps'))} | "
            f"{_fmt(stage.get('wall_time_s'))} | {_fmt(stage.get('final_loss'), 4)} |"
        )
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    held_out = report.get("held_out", {})
    parts = [
        "# Evaluation: student vs teacher",
        (
            f"Held-out set: {held_out.get('sequences')} sequences, {held_out.get('tokens')} loss tokens; "
            "both models read the same rows in one pass (fp32)."
        ),
        markdown_table(report),
    ]
    if (report.get("generations") or {}).get("examples"):
        parts += ["## Answers side by side", _examples_text(report["generations"])]
    if report.get("stages"):
        total = report.get("wall_time_s")
        parts += ["## Stages", _stages_table(report["stages"])]
        if total is not None:
            parts.append(f"Whole run wall time: {total:.0f} s.")
    if report.get("selection"):
        parts += ["## Attention layers chosen from data", _selection_text(report["selection"])]
    if report.get("speed_note"):
        parts.append(report["speed_note"])
    parts += [f"![{Path(name).stem}]({name})" for name in report.get("plots", [])]
    if report.get("recipe"):
        recipe = report["recipe"]
        body = json.dumps(recipe, indent=2) if isinstance(recipe, dict) else str(recipe)
        parts += ["## Recipe", f"```{'json' if isinstance(recipe, dict) else ''}\n{body}\n```"]
    return "\n\n".join(parts) + "\n"


def _examples_text(generations: dict) -> str:
    """The first held-out prompts with the teacher's and the student's greedy answers."""
    lines = [(f"Greedy answers to held-out prompts ({generations['prompts']} judged, at most "
             f"{generations['max_new_tokens']} new tokens; the first {len(generations['examples'])} shown).")]
    for example in generations["examples"]:
        lines += ["", "**Prompt**", "```", example["prompt"].strip(), "```", "**Teacher**", "```",
                  example["teacher"].strip(), "```", "**Student**", "```", example["student"].strip(), "```"]
    return "\n".join(lines)


def _selection_text(record: dict) -> str:
    """The layer scores of `distill.selection` and the choice they made."""
    scores = record["scores"]
    lines = [
        (f"Attention kept at {record['attention_layers']} (uniform placement: {record['uniform_layers']}). Each "
        f"layer's score is the teacher's KL with that one layer's attention swapped for its aligned mixer "
        f"({record['score_rows']} training rows); the highest keep attention. Alignment of every layer: "
        f"{record['align_tokens']:,} tokens, {record['align_seconds']:.0f} s"
        f"{' (reused from the cache)' if record.get('align_reused') else ''}; scoring {record['score_seconds']:.0f} s."),
        "",
        "| layer | " + " | ".join(str(i) for i in range(len(scores))) + " |",
        "|---|" + "---:|" * len(scores),
        "| KL | " + " | ".join(f"{value:.3f}" for value in scores) + " |",
    ]
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(to_markdown(report))


# ----------------------------------------------------------------------------- plots


def plot_losses(logs: dict[str, list[dict]], path: Path) -> Path | None:
    """Training loss vs tokens, one panel per stage (stages optimise different losses, so separate y-axes)."""
    logs = {name: rows for name, rows in logs.items() if rows}
    if not logs:
        return None
    fig, axes = plt.subplots(1, len(logs), figsize=(4.5 * len(logs), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], logs.items()):
        marker = "o" if len(rows) <= 50 else None  # a short stage may log a single step
        ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], color="tab:blue", marker=marker)
        ax.set_title(name)
        ax.set_xlabel("tokens seen in this stage")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    fig.suptitle("Training loss per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _per_batch_plot(rows: list[dict], value, ylabel: str, title: str, path: Path, log_y: bool) -> Path:
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for model in dict.fromkeys(r["model"] for r in rows):
            points = sorted(
                (r["context"], value(r)) for r in rows if r["model"] == model and r["batch"] == batch
            )
            ax.plot(*zip(*points), marker="o", label=model)
        ax.set_xscale("log", base=2)
        contexts = sorted({r["context"] for r in rows if r["batch"] == batch})
        ax.set_xticks(contexts, [f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts])
        ax.xaxis.set_minor_locator(NullLocator())
        if log_y:
            ax.set_yscale("log")
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context length (tokens already in the cache)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_selection(record: dict, path: Path) -> Path:
    """Bar plot of each layer's swap score (`distill.selection`), the layers that keep attention in red."""
    import matplotlib.pyplot as plt

    scores, kept = record["scores"], set(record["attention_layers"])
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(scores)), 3.5))
    ax.bar(range(len(scores)), scores, color=["tab:red" if i in kept else "tab:blue" for i in range(len(scores))])
    ax.set(xlabel="layer (red: keeps attention)", ylabel="teacher's KL with the layer swapped",
           title=f"layer selection: {len(kept)} of {len(scores)} layers keep attention", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(rows: list[dict], out_dir: Path) -> list[Path]:
    """decode_speed.png (tokens/s vs context) and decode_memory.png (KV cache + SSM state vs context)."""
    if not rows:
        return []
    return [
        _per_batch_plot(
            rows,
            lambda r: r["decode_tok_s"],
            "decode tokens/s (all sequences)",
            "Decode speed vs context length",
            out_dir / "decode_speed.png",
            log_y=False,
        ),
        _per_batch_plot(
            rows,
            lambda r: max((r["kv_cache_bytes"] + r["ssm_state_bytes"]) / MiB, 1e-3),
            "KV cache + SSM state (MiB)",
            "Decode-time memory vs context length",
            out_dir / "decode_memory.png",
            log_y=True,
        ),
    ]


def plot_needle(needle: dict[str, dict], path: Path) -> Path | None:
    """Passkey accuracy heatmap (depth x length), one panel per model."""
    if not needle:
        return None
    fig, axes = plt.subplots(
        1, len(needle), figsize=(4.2 * len(needle) + 1, 3.8), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, (model, grid) in zip(axes[0], needle.items()):
        lengths, depths = grid["lengths"], grid["depths"]
        image = ax.imshow(grid["accuracy"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid["accuracy"]):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.2f}", ha="center", va="center", color="white" if acc < 0.6 else "black")
        ax.set_title(model)
        ax.set_xlabel("prompt length (tokens)")
    axes[0][0].set_ylabel("passkey depth in the prompt")
    fig.colorbar(image, ax=axes[0].tolist(), label="retrieval accuracy")
    train_length = next(iter(needle.values())).get("train_length")
    note = f" (student distilled on {train_length}-token rows)" if train_length else ""
    fig.suptitle(f"Passkey retrieval accuracy{note}")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_metrics_log(stage_dir: Path) -> list[dict]:
    """The stage's `metrics.jsonl` rows with `tokens` and `loss`; [] when the log is missing."""
    path = Path(stage_dir) / "metrics.jsonl"
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by an interrupted run
        if (
            isinstance(row, dict)
            and isinstance(row.get("tokens"), (int, float))
            and isinstance(row.get("loss"), (int, float))
        ):
            rows.append(row)
    return rows
