"""The study's report writer: docs/results.md and its plots from the results table (`study_runs.collect`)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from study_arms import ARMS, SHARED_FIRST_STAGE

# (attention fraction, perplexity-ratio target, KL target or None) below 50%, each within 2 CPU-hours
LOW_FRACTION_TARGETS = [(0.25, 1.10, 0.15), (0.125, 1.30, None), (0.0, 2.0, None)]


def target_lines(arms: dict) -> list[str]:
    """The study's quality targets, checked against the table: met or missed, and by how much."""
    def verdict(value: float, bar: float) -> str:
        return f"{value:.3f} against ≤ {bar} ({'met' if value <= bar else f'missed by {value / bar:.2f}×'})"

    lines = ["## Targets", ""]
    within = {n: a for n, a in arms.items() if a["mixer"] == "mamba2" and a["cpu_hours"] <= 2}  # the targets' budget
    fifty = {n: a for n, a in within.items() if a["attention_fraction"] == 0.5}
    if fifty:
        name, best = min(fifty.items(), key=lambda item: item[1]["kl_to_teacher"])
        hours = best["cpu_hours"]
        lines += [f"- Best 50% Mamba-2 arm, `{name}` ({hours:.2f} CPU-hours of distillation, target ≤ 2):",
                  f"  - perplexity ratio {verdict(best['perplexity_ratio'], 1.10)};",
                  f"  - KL {verdict(best['kl_to_teacher'], 0.15)}."]
        missed = best["perplexity_ratio"] > 1.10 or best["kl_to_teacher"] > 0.15
        fit = power_law(best["curves"].get("end_to_end", [])) if missed else None
        if fit and best["kl_to_teacher"] > 0.15:
            scale, slope = fit
            e2e_tokens = best["stage_tokens"]["end_to_end"]
            tokens = (0.15 / scale) ** (1 / slope) if slope < 0 else math.inf
            if tokens < 100 * e2e_tokens:
                seconds = tokens / e2e_tokens * best["stage_wall_s"]["end_to_end"]
                lines.append(
                    f"  - Its end-to-end training KL follows ≈ {scale:.3g}·tokens^{slope:.3f} over the second half "
                    f"of the stage; extrapolated, KL 0.15 needs ≈ {tokens:.2g} end-to-end tokens, "
                    f"≈ {seconds / 3600:.1f} hours at this arm's rate (train-batch KL, a rough guide).")
            else:
                lines.append(
                    f"  - Its end-to-end training KL is nearly flat over the second half of the stage (fitted "
                    f"exponent {slope:+.3f}): more tokens of the same stage alone would not reach 0.15.")
        lines += layerwise_scaling_lines(arms) if missed else []
        variants = {n: a["kl_to_teacher"] for n, a in arms.items() if a["comparison"] == "e2e"}
        if len(variants) > 1:
            low, high = min(variants, key=variants.get), max(variants, key=variants.get)
            lines.append(f"  - End-to-end variants from one layerwise checkpoint (the `e2e` arms: lr and trainable "
                         f"weights) span KL {variants[low]:.3f} (`{low}`) to {variants[high]:.3f} (`{high}`), "
                         f"a {variants[high] / variants[low] - 1:.0%} spread: the end-to-end settings are not the lever.")
    for fraction, ratio_bar, kl_bar in LOW_FRACTION_TARGETS:
        arms_at = {n: a for n, a in within.items() if a["attention_fraction"] == fraction}
        if not arms_at:
            continue
        name, best = min(arms_at.items(), key=lambda item: item[1]["perplexity_ratio"])
        kl = verdict(best["kl_to_teacher"], kl_bar) if kl_bar else f"{best['kl_to_teacher']:.3f}"
        lines.append(f"- Best {fraction:.1%} Mamba-2 arm, `{name}` ({best['cpu_hours']:.2f} CPU-hours, target ≤ 2): "
                     f"perplexity ratio {verdict(best['perplexity_ratio'], ratio_bar)}; KL {kl}.")
    if "attn50-mamba2" in arms and "attn50-mamba2-random-init" in arms:
        ours, random = arms["attn50-mamba2"], arms["attn50-mamba2-random-init"]
        beats = ours["kl_to_teacher"] < random["kl_to_teacher"] and ours["perplexity_ratio"] < random["perplexity_ratio"]
        lines.append(f"- Attention init (calibrated) vs random init at equal budget: KL {ours['kl_to_teacher']:.3f} "
                     f"vs {random['kl_to_teacher']:.3f}, perplexity ratio {ours['perplexity_ratio']:.3f} vs "
                     f"{random['perplexity_ratio']:.3f} ({'attention init wins' if beats else 'attention init does not win'}).")
    return lines + [""]


def layerwise_scaling_lines(arms: dict) -> list[str]:
    """Extrapolate the budget arms (same end-to-end tokens, growing layerwise tokens) to the quality targets with
    a power law in layerwise tokens: of the KL, and of the perplexity ratio's excess over 1."""
    import numpy as np

    budget = sorted((a for a in arms.values() if a["comparison"] == "budget" and "layerwise" in a["stage_tokens"]),
                    key=lambda a: a["stage_tokens"]["layerwise"])
    if len(budget) < 2 or len({a["stage_tokens"]["end_to_end"] for a in budget}) > 1:
        return []
    tokens = np.log([a["stage_tokens"]["layerwise"] for a in budget])
    largest = budget[-1]
    rate = largest["stage_tokens"]["layerwise"] / largest["stage_wall_s"]["layerwise"]
    parts = []
    for label, values, bar in (("KL", [a["kl_to_teacher"] for a in budget], 0.15),
                               ("perplexity ratio - 1", [a["perplexity_ratio"] - 1 for a in budget], 0.10)):
        slope, intercept = np.polyfit(tokens, np.log(values), 1)
        if slope >= 0:
            parts.append(f"{label} does not fall with more layerwise tokens")
            continue
        needed = math.exp((math.log(bar) - intercept) / slope)
        parts.append(f"{label} ∝ tokens^{slope:.2f} reaches {bar} at ≈ {needed:.1e} layerwise tokens "
                     f"(≈ {needed / rate / 3600:.1f} hours of layerwise at {rate:.0f} tokens/s)")
    sizes = ", ".join(f"{a['stage_tokens']['layerwise']:.0e}" for a in budget)
    line = (f"  - The budget arms ({sizes} layerwise tokens, the same end-to-end tokens), fitted with a power law "
            f"in layerwise tokens: {'; '.join(parts)}. A rough guide from {len(budget)} points.")
    return [line]


def power_law(curve: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares fit of loss ≈ scale · tokens^slope over the second half of a loss curve."""
    import numpy as np

    half = curve[len(curve) // 2 :]
    if len(half) < 8:
        return None
    slope, intercept = np.polyfit(np.log([t for t, _ in half]), np.log([loss for _, loss in half]), 1)
    return float(np.exp(intercept)), float(slope)


def ema(values: list[float], decay: float = 0.9) -> list[float]:
    smoothed, level = [], values[0]
    for value in values:
        level = decay * level + (1 - decay) * value
        smoothed.append(level)
    return smoothed


def write_report(results: dict, docs: Path, command: str) -> None:
    """results.md and its plots in `docs`, from the results table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    docs.mkdir(parents=True, exist_ok=True)
    shared = "; ".join(f"{count} arms link `{source}`'s" for source, count in
                       Counter(SHARED_FIRST_STAGE.values()).items()) or "none does"
    arms = results["arms"]
    contexts = sorted({c for arm in arms.values() for c in arm.get("decode", {})}, key=int)
    head = "| arm | comparison | ppl ratio | KL | top-1 | lm-eval | " + "".join(
        f"decode@{c} tok/s (× teacher) | " for c in contexts) + "tokens (selection, stages) | wall (min) | CPU-h |"
    teacher_decode = results.get("teacher_decode", {})
    lines = [
        "# CPU-scale reproduction study",
        "",
        f"Produced by `{command}` (see scripts/study.py; rerunning it skips finished arms and resumes the rest).",
        "",
        ("Teacher: SmolLM2-135M-Instruct; data: ShareGPT, 512-token packed rows; every arm has the same data order, "
         "seed and 64 held-out sequences. Perplexity is on held-out assistant tokens; KL is the mean "
         "KL(teacher‖student) per assistant token in nats; top-1 is next-token argmax agreement with the teacher. "
         "lm-eval runs the stock `hf` model on the exported checkpoint (shipped local tasks). Decode tok/s is "
         "batch 1 at the given context, fp32, one thread (timed in thread CPU time). CPU-h = wall time of the "
         "stages × the arm's torch threads; an arm that links another's finished layerwise stage counts that "
         f"stage's time too ({shared}). Decode speed and lm-eval are noisy on this shared box: read them as "
         "rough. † marks an arm run on an earlier machine whose outputs are gone: its row is kept from "
         "the persisted table, results.json (running its arm again replaces it), and its CPU-hours are on that machine's clock, "
         "which may differ from this one's: compare CPU-hours only between arms run here."),
        "",
        f"Teacher perplexity: {results.get('teacher', {}).get('perplexity', float('nan')):.3f}; teacher decode: "
        + ", ".join(f"{v['decode_tok_s']:.1f} tok/s at {c}" for c, v in teacher_decode.items()),
        "",
        *([f"Not run yet (rerun the command to run them): {', '.join(sorted(set(ARMS) - set(arms)))}.", ""]
          if set(ARMS) - set(arms) else []),
        *target_lines(arms),
        *frontier_lines(arms),
        "## Table",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for name, arm in arms.items():
        lm = "; ".join(f"{task}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
                       for task, metrics in arm.get("lm_eval", {}).items())
        decode = [f"{arm['decode'][c]['decode_tok_s']:.1f} ({arm['decode'][c]['speedup_vs_teacher']:.2f}×)"
                  if c in arm.get("decode", {}) else "" for c in contexts]
        tokens = " + ".join(f"{t:,}" for t in arm["stage_tokens"].values())
        lines.append(f"| {name}{' †' if arm.get('kept') else ''} | {arm['comparison']} | {arm['perplexity_ratio']:.3f} | {arm['kl_to_teacher']:.3f} | "
                     f"{arm['top1_agreement']:.3f} | {lm} | " + "".join(f"{d} | " for d in decode) +
                     f"{tokens} | {arm['wall_time_s'] / 60:.0f} | {arm['cpu_hours']:.2f} |")
    if arms:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(arms) + 1.5))
        names = list(arms)
        for ax, key, label in ((axes[0], "perplexity_ratio", "held-out perplexity / teacher's"),
                               (axes[1], "kl_to_teacher", "KL(teacher‖student), nats/token")):
            bars = ax.barh(names, [arms[n][key] for n in names])
            ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
            ax.set_xlabel(label)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the 2-9 minor labels overlap
            ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(docs / "results.png", dpi=120)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for index, (name, arm) in enumerate(arms.items()):
            color = plt.get_cmap("tab20")(index % 20)  # one color per arm in both panels
            for ax, stage in ((axes[0], "layerwise"), (axes[1], "end_to_end")):
                curve = arm["curves"].get(stage)
                if stage == "layerwise" and name in SHARED_FIRST_STAGE:  # the source arm's curve, drawn already
                    continue
                if curve and (stage == "layerwise" or arm["comparison"] != "kl"):  # other KLs are other units
                    ax.plot([t for t, _ in curve], ema([loss for _, loss in curve]), label=name, lw=1, color=color)
        axes[0].set(title="layerwise: summed per-layer MSE (train, EMA)", xlabel="tokens", yscale="log")
        axes[1].set(title="end-to-end: forward KL (train, EMA)", xlabel="tokens", yscale="log")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(docs / "results_curves.png", dpi=120)
        plt.close(fig)
        plot_frontier(arms, docs / "results_frontier.png")
        plot_speed_frontier(arms, docs / "results_speed.png")
        lines += ["", "![perplexity ratio and KL per arm](results.png)", "",
                  "![quality vs CPU-hours: every arm, the frontier joined](results_frontier.png)", "",
                  "![training loss curves](results_curves.png)"]
    (docs / "results.md").write_text("\n".join(lines) + "\n")


def best_per_fraction(arms: dict) -> dict[float, tuple[str, dict]]:
    """Per attention fraction, the Mamba-2 arm with the lowest held-out perplexity ratio within the targets'
    2 CPU-hours: the point a user picks from."""
    best: dict[float, tuple[str, dict]] = {}
    for name, arm in arms.items():
        fraction = arm["attention_fraction"]
        if arm["mixer"] == "mamba2" and arm["cpu_hours"] <= 2 and (
                fraction not in best or arm["perplexity_ratio"] < best[fraction][1]["perplexity_ratio"]):
            best[fraction] = (name, arm)
    return dict(sorted(best.items(), reverse=True))


def frontier_lines(arms: dict) -> list[str]:
    """The quality-speed table: per attention fraction, the best arm's quality against its decode speedup."""
    best = best_per_fraction(arms)
    if not best:
        return []
    contexts = sorted({c for _, arm in best.values() for c in arm.get("decode", {})}, key=int)
    lines = ["## The quality-speed frontier", "",
             ("Per attention fraction, the best held-out perplexity ratio within 2 CPU-hours (the arm named), "
             "against its decode speedup over the teacher (batch 1, fp32, one thread, the table's columns). A fraction "
             "whose best arm is a short-budget one has not had its 2-CPU-hour arm yet: its ratio is an upper "
             "bound on what the fraction reaches in 2 CPU-hours, not an estimate of it. A † arm's speedups were timed on an "
              "earlier machine."), "",
             "| attention | best arm | ppl ratio | KL | CPU-h | "
             + " | ".join(f"decode × teacher @{c}" for c in contexts) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(contexts)]
    for fraction, (name, arm) in best.items():
        speed = [f"{arm['decode'][c]['speedup_vs_teacher']:.2f}×" if c in arm.get("decode", {}) else "-"
                 for c in contexts]
        lines.append(f"| {fraction:.1%} | `{name}`{' †' if arm.get('kept') else ''} | {arm['perplexity_ratio']:.3f} | "
                     f"{arm['kl_to_teacher']:.3f} | {arm['cpu_hours']:.2f} | " + " | ".join(speed) + " |")
    return lines + ["", "![quality against decode speedup, per attention fraction](results_speed.png)", ""]


def plot_speed_frontier(arms: dict, path: Path) -> None:
    """Held-out perplexity ratio against decode speedup at each context, one point per attention fraction."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    best = best_per_fraction(arms)
    contexts = sorted({c for _, arm in best.values() for c in arm.get("decode", {})}, key=int)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for index, context in enumerate(contexts):
        points = [(arm["decode"][context]["speedup_vs_teacher"], arm["perplexity_ratio"], fraction)
                  for fraction, (_, arm) in best.items() if context in arm.get("decode", {})]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=plt.get_cmap("tab10")(index),
                label=f"decode at {context} tokens")
        for speedup, ratio, fraction in points:
            ax.annotate(f"{fraction:.1%}", (speedup, ratio), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set(xlabel="decode speedup over the teacher (batch 1, fp32)", ylabel="held-out perplexity / teacher's "
           "(best within 2 CPU-hours)", yscale="log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))  # 1.2, not 1.2 x 10^0
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (cost, loss, name) points that no cheaper point beats on loss, cheapest first."""
    best, kept = math.inf, []
    for cost, loss, name in sorted(points):
        if loss < best:
            best = loss
            kept.append((cost, loss, name))
    return kept


def plot_frontier(arms: dict, path: Path) -> None:
    """KL and perplexity ratio against CPU-hours for every arm (selection's cost included), per attention
    fraction; the frontier of each fraction is joined."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    fractions = sorted({a["attention_fraction"] for a in arms.values() if a["mixer"] == "mamba2"}, reverse=True)
    for ax, key, label in ((axes[0], "kl_to_teacher", "KL(teacher‖student), nats/token"),
                           (axes[1], "perplexity_ratio", "held-out perplexity / teacher's")):
        for index, fraction in enumerate(fractions):
            color = plt.get_cmap("tab10")(index)
            points = [(a["cpu_hours"], a[key], n) for n, a in arms.items()
                      if a["mixer"] == "mamba2" and a["attention_fraction"] == fraction]
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, s=18,
                       label=f"{fraction:.0%} attention")
            line = frontier(points)
            ax.plot([p[0] for p in line], [p[1] for p in line], color=color, lw=1)
            for cost, value, name in points:
                ax.annotate(name.replace("-mamba2", ""), (cost, value), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        ax.set(xlabel="CPU-hours (distillation, selection included)", ylabel=label, xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
