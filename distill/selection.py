"""Attention layers chosen from data, and "align once, assemble later" (a recipe's `selection` section).

The `selection` stage (`distill.stages.selection`) runs first, on a student with a Mamba mixer at every layer,
through the same runner as every stage (its folder is `selection/`); `prepare_student` then resolves the
attention layers from its summary, before the resolved recipe.yaml is written, and assembles the student.

1. Align: the all-Mamba student is aligned layerwise (one teacher pass feeds all of its mixers;
   `distill.alignment.align`). Its mixers are cached under `selection.cache_dir` (default
   `$MAMBA_DISTILL_CACHE/aligned`), keyed by the teacher, the data, the student's mixer settings, the
   alignment settings and the seed, so any later recipe that differs only in its attention layers reuses them.
2. Score: for each layer, the teacher with that one layer's attention swapped for its aligned mixer runs on
   the last `score_rows` training rows (not the held-out rows, which judge the result); the layer's score is
   that model's KL to the teacher (nats per loss token), i.e. how much the teacher suffers when exactly that
   layer loses its attention. Cached with the mixers.
3. Choose (`student.attention_layers: auto`): attention stays at the round(fraction x layers) layers with the
   highest scores. The resolved recipe.yaml records the list, and `selection/scores.json` the scores. Only the
   choice depends on the fraction, so another fraction reuses the stage's scores.
4. Assemble: whatever the attention layers, the student's mixers start from the aligned ones, so the recipe's
   own layerwise stage continues from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distill.assets import cache_root
from distill.data import loss_positions, model_inputs
from distill.files import atomic_file, write_text
from distill.layout import read_summary
from distill.losses import distill_kl
from distill.modeling_hybrid import is_mixer_param
from distill.stages import run
from distill.trainer import batches

logger = logging.getLogger(__name__)


def cache_key(recipe, teacher) -> dict:
    """Everything the aligned mixers depend on (not the attention layers, stages, eval or output_dir)."""
    student = recipe.student.model_dump(mode="json", exclude={"attention_layers", "attention_fraction"})
    align = recipe.selection.align.model_dump(mode="json", exclude={
        "checkpoint_every_tokens", "keep_checkpoints", "resume", "log_every_steps", "held_out_rows",
        "cache_max_gb"})
    return {
        "teacher": recipe.teacher.model_dump(mode="json"),
        "teacher_checksum": float(teacher.lm_head.weight.detach().double().sum()),
        "teacher_layers": teacher.config.num_hidden_layers,
        "data": recipe.data.model_dump(mode="json"),
        "student": student,
        "align": align,
        "seed": recipe.seed,
        "precision": recipe.precision,
    }


def aligned_dir(recipe, teacher) -> Path:
    """The cache folder of the mixers aligned for every layer under `recipe` (see `cache_key`)."""
    key = cache_key(recipe, teacher)
    root = recipe.selection.cache_dir or cache_root() / "aligned"
    return Path(root) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def all_mamba_student(ctx, calibration_input_ids):
    """The student with a Mamba mixer at every layer, initialised like the recipe's student."""
    from distill.init import hybrid_from_teacher

    cfg = ctx.recipe.student.model_copy(update={"attention_layers": [], "attention_fraction": None})
    return hybrid_from_teacher(ctx.teacher, cfg, seed=ctx.recipe.seed,
                               calibration_input_ids=calibration_input_ids)


def align_every_layer(ctx, student, stage_dir: Path) -> dict:
    """Align every mixer of the all-Mamba `student`, or load the ones cached for this recipe; returns the
    alignment's summary (with `reused`: whether it came from the cache)."""
    from distill.alignment import align

    folder = aligned_dir(ctx.recipe, ctx.teacher)
    weights = folder / "mixers.safetensors"
    if weights.is_file():
        summary = json.loads((folder / "summary.json").read_text())
        logger.info("selection: reusing the mixers aligned for every layer in %s (%d tokens, %.0f s when "
                    "aligned); no alignment runs", folder, summary["tokens"], summary["wall_time_s"])
        student.load_state_dict(load_file(weights), strict=False)
        return {**summary, "reused": True}
    cfg = ctx.recipe.selection.align
    logger.info("selection: aligning a mixer for each of the %d layers on %d tokens (cached in %s)",
                student.config.num_hidden_layers, cfg.max_tokens, folder)
    summary = align(ctx, cfg, student, stage_dir)
    state = {name: p.detach().contiguous() for name, p in student.state_dict().items()
             if is_mixer_param(name)}
    if ctx.accelerator.is_main_process:
        write_text(folder / "key.json", json.dumps(cache_key(ctx.recipe, ctx.teacher), indent=2))
        write_text(folder / "summary.json", json.dumps(summary, indent=2))
        with atomic_file(weights) as tmp:  # last: its presence means the folder is complete
            save_file(state, tmp)
    ctx.accelerator.wait_for_everyone()
    return {**summary, "reused": False}


@torch.no_grad()
def swap_scores(accelerator, teacher, mixers: dict[int, torch.nn.Module], rows,
                batch_size: int) -> list[float]:
    """Per layer i: the KL(teacher || teacher with layer i's attention output replaced by mixers[i]'s output)
    in nats per loss token on `rows`, one layer swapped at a time."""
    totals, count = dict.fromkeys(mixers, 0.0), 0
    for batch in batches(rows, batch_size, accelerator.device):
        inputs, mask = model_inputs(batch), loss_positions(batch["labels"])
        with accelerator.autocast():
            reference = teacher.model(**inputs).last_hidden_state
        count += int(mask.sum())
        for i, mixer in mixers.items():
            def swap(module, args, kwargs, output, mixer=mixer, position_ids=batch["position_ids"]):
                hidden = args[0] if args else kwargs["hidden_states"]
                return (mixer(hidden, attention_mask=None, position_ids=position_ids), *output[1:])

            handle = teacher.model.layers[i].self_attn.register_forward_hook(swap, with_kwargs=True)
            try:
                with accelerator.autocast():
                    hidden = teacher.model(**inputs).last_hidden_state
            finally:
                handle.remove()
            totals[i] += float(distill_kl(hidden, reference, mask, student_head=teacher.lm_head.weight,
                                          teacher_head=teacher.lm_head.weight, reduction="sum"))
    return [totals[i] / max(count, 1) for i in sorted(mixers)]


def layer_scores(ctx, student, folder: Path) -> tuple[list[float], float]:
    """Each layer's swap score (cached next to the aligned mixers) and the seconds scoring took."""
    rows = ctx.recipe.selection.score_rows
    path = folder / f"scores-{rows}rows.json"
    if path.is_file():
        logger.info("selection: reusing the layer scores in %s", path)
        cached = json.loads(path.read_text())
        return cached["scores"], cached["seconds"]
    started = time.perf_counter()
    mixers = {i: layer.mamba for i, layer in enumerate(student.model.layers)}
    # the last training rows, not the held-out ones: the final evaluation must not have picked the layers
    scored = ctx.train.select(range(max(0, len(ctx.train) - rows), len(ctx.train)))
    scores = swap_scores(ctx.accelerator, ctx.teacher, mixers, scored, batch_size=4)
    seconds = time.perf_counter() - started
    if ctx.accelerator.is_main_process:
        write_text(path, json.dumps({"scores": scores, "rows": rows, "seconds": seconds}))
    return scores, seconds


def choose(scores: list[float], fraction: float) -> list[int]:
    """The round(fraction x layers) layers whose swap hurts the teacher most, in order."""
    k = round(fraction * len(scores))
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])


def uniform_layers(num_layers: int, fraction: float) -> list[int]:
    from distill.init import select_attention_layers

    if not round(fraction * num_layers):
        return []
    return select_attention_layers(num_layers, attention_fraction=fraction)


def record(recipe, summary: dict) -> dict:
    """The choice of attention layers from the selection stage's summary (`selection/scores.json`)."""
    scores, fraction = summary["scores"], recipe.student.attention_fraction
    return {"attention_layers": choose(scores, fraction), "fraction": fraction, "scores": scores,
            "uniform_layers": uniform_layers(len(scores), fraction), "cache": summary["cache"],
            "align_tokens": summary["tokens"], "align_seconds": summary["wall_time_s"],
            "align_reused": summary["reused"], "score_seconds": summary["score_seconds"],
            "score_rows": summary["score_rows"], "seconds": summary["seconds"]}


def prepare_student(ctx, calibration_input_ids):
    """Run the selection stage, resolve `attention_layers: auto` and build the student with its mixers
    from the aligned ones. Returns (recipe with the attention layers as a list, student).

    The choice is recorded in `selection/scores.json`; a rerun finds the stage finished and chooses again from
    its scores (a different fraction gives a different choice without aligning or scoring again).
    """
    from distill.eval.report import plot_selection
    from distill.init import hybrid_from_teacher

    recipe, layout = ctx.recipe, ctx.layout
    aligned = run(ctx, recipe.selection, all_mamba_student(ctx, calibration_input_ids), layout.selection,
                  label="selection (align every layer)", seed=recipe.seed)
    if recipe.student.attention_layers == "auto":
        summary = read_summary(layout.selection)
        if "scores" not in summary:  # the stage finished earlier for a recipe with fixed layers
            folder = aligned_dir(recipe, ctx.teacher)
            summary["scores"], summary["score_seconds"] = layer_scores(ctx, aligned, folder)
        choice = record(recipe, summary)
        if ctx.accelerator.is_main_process:
            write_text(layout.selection_record, json.dumps(choice, indent=2))
            plot_selection(choice, layout.selection / "scores.png")
        logger.info("selection: attention kept at %s (uniform placement would keep %s)",
                    choice["attention_layers"], choice["uniform_layers"])
        student_cfg = recipe.student.model_copy(update={"attention_layers": choice["attention_layers"],
                                                        "attention_fraction": None})
        recipe = recipe.model_copy(update={"student": student_cfg})
    student = hybrid_from_teacher(ctx.teacher, recipe.student, seed=recipe.seed,
                                  calibration_input_ids=calibration_input_ids)
    mine = {name: value for name, value in aligned.state_dict().items()
            if is_mixer_param(name) and name in student.state_dict()}
    student.load_state_dict(mine, strict=False)
    logger.info("selection: the student's %d mixers start from the aligned ones", len(
        {name.split(".mamba.")[0] for name in mine}))
    return recipe, student
