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
3. Choose (`student.attention_layers: auto`): with `selection.method: single`, attention stays at the
   round(fraction x layers) layers with the highest scores. With `greedy`, the layers are swapped one at a
   time from the teacher, each time the one whose swap raises the KL least given the swaps already made
   (re-scored with the current assembly and the same aligned mixers; see `greedy_steps`), until that many keep
   attention: the swaps interact, most of all at low fractions. The resolved recipe.yaml records the list, and
   `selection/scores.json` the scores. Only the choice depends on the fraction, so another fraction reuses
   the stage's scores (and greedy's steps so far).
4. Assemble: whatever the attention layers, the student's mixers start from the aligned ones, so the recipe's
   own layerwise stage continues from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
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
from distill.trainer import batches, resolve_precision

logger = logging.getLogger(__name__)


def cache_key(recipe, teacher) -> dict:
    """Everything the aligned mixers depend on (not the attention layers, stages, eval or output_dir)."""
    student = recipe.student.model_dump(mode="json", exclude={"attention_layers", "attention_fraction"})
    if student["mamba2_d_state"] is None:  # unset it changes nothing, so keys from before it stay valid
        del student["mamba2_d_state"]
    align = recipe.selection.align.model_dump(mode="json", exclude={
        "checkpoint_every_tokens", "keep_checkpoints", "resume", "log_every_steps", "held_out_rows",
        "cache_max_gb", "cache_storage", "cache_dir", "inputs"})  # inputs: always teacher here
    return {
        "teacher": recipe.teacher.model_dump(mode="json"),
        "teacher_checksum": float(teacher.lm_head.weight.detach().double().sum()),
        "teacher_layers": teacher.config.num_hidden_layers,
        "data": recipe.data.model_dump(mode="json"),
        "student": student,
        "align": align,
        "seed": recipe.seed,
        "precision": resolve_precision(recipe).precision,  # what ran: `auto` differs between machines
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


def swap_attention(teacher, layer: int, mixer, position_ids):
    """Make the teacher's attention at `layer` output `mixer`'s output instead, until the handle is
    removed."""

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (mixer(hidden, attention_mask=None, position_ids=position_ids), *output[1:])

    return teacher.model.layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True)


@contextmanager
def recording_layer_inputs(teacher):
    """Yields a list that a forward inside the block fills with the hidden states entering each layer."""
    entering = []

    def record(module, args, kwargs):
        entering.append(args[0] if args else kwargs["hidden_states"])

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in teacher.model.layers]
    try:
        yield entering
    finally:
        for handle in handles:
            handle.remove()


class Replay(torch.nn.Module):
    """Stands in for a decoder layer: returns what the layer returned in a recorded forward; runs nothing."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return self.output


def forward_from(teacher, layer: int, entering: list[torch.Tensor], inputs: dict) -> torch.Tensor:
    """The teacher's final hidden states, the layers before `layer` replayed from `entering` (the states that
    entered each layer in a recorded forward) instead of run. The model's own forward still builds the masks
    and RoPE and indexes its per-layer types, so every family runs as it does whole."""
    model, layers = teacher.model, teacher.model.layers
    model.layers = torch.nn.ModuleList([Replay(entering[j + 1]) for j in range(layer)] + list(layers[layer:]))
    try:
        return model(**inputs).last_hidden_state
    finally:
        model.layers = layers


@torch.no_grad()
def swap_scores(accelerator, teacher, mixers: dict[int, torch.nn.Module], rows, batch_size: int,
                candidates: list[int] | None = None, swapped: list[int] = ()) -> list[float]:
    """Per layer i of `candidates` (default: every layer of `mixers`), in order: the KL(teacher || the teacher
    with the attention output of layer i and of every layer in `swapped` replaced by their mixers' outputs)
    in nats per loss token on `rows`. With nothing swapped, that is one layer swapped at a time.

    The layers before i compute what they compute without the swap at i, so each batch runs them once: the
    states entering every layer are recorded (by the reference forward, or with `swapped`, one forward with
    those swaps), and each candidate's forward starts at its layer. Swapping one layer at a time then costs
    about half the layer compute of a whole forward per candidate."""
    candidates = sorted(mixers) if candidates is None else sorted(candidates)
    totals, count = dict.fromkeys(candidates, 0.0), 0
    for batch in batches(rows, batch_size, accelerator.device):
        inputs, mask = model_inputs(batch), loss_positions(batch["labels"])
        with accelerator.autocast(), recording_layer_inputs(teacher) as entering:
            reference = teacher.model(**inputs).last_hidden_state
        count += int(mask.sum())
        handles = [swap_attention(teacher, i, mixers[i], batch["position_ids"]) for i in swapped]
        try:
            if swapped:
                with accelerator.autocast(), recording_layer_inputs(teacher) as entering:
                    teacher.model(**inputs)
            for i in candidates:
                handle = swap_attention(teacher, i, mixers[i], batch["position_ids"])
                try:
                    with accelerator.autocast():
                        hidden = forward_from(teacher, i, entering, inputs)
                finally:
                    handle.remove()
                totals[i] += float(distill_kl(hidden, reference, mask, student_head=teacher.lm_head.weight,
                                              teacher_head=teacher.lm_head.weight, reduction="sum"))
        finally:
            for handle in handles:
                handle.remove()
    return [totals[i] / max(count, 1) for i in candidates]


def scored_rows(ctx):
    """The rows swaps are scored on: the last `score_rows` training rows, not the held-out ones (the final
    evaluation must not have picked the layers)."""
    rows = ctx.recipe.selection.score_rows
    return ctx.train.select(range(max(0, len(ctx.train) - rows), len(ctx.train)))


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
    scores = swap_scores(ctx.accelerator, ctx.teacher, mixers, scored_rows(ctx), batch_size=4)
    seconds = time.perf_counter() - started
    if ctx.accelerator.is_main_process:
        write_text(path, json.dumps({"scores": scores, "rows": rows, "seconds": seconds}))
    return scores, seconds


def choose(scores: list[float], fraction: float) -> list[int]:
    """The round(fraction x layers) layers whose swap hurts the teacher most, in order."""
    k = round(fraction * len(scores))
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])


def greedy_steps(ctx, student, single: list[float], keep: int) -> list[dict]:
    """`selection.method: greedy`: starting from the teacher, swap in, one at a time, the aligned mixer whose
    swap, on top of those already swapped, raises the KL to the teacher least, until `keep` layers keep their
    attention. Each step re-scores every remaining layer with the current assembly (the mixers are the aligned
    ones: nothing is re-aligned); the first step's scores are the single-swap `single`, so with one layer to
    swap greedy chooses what `choose` does.

    The steps ({"layer", "kl", "scores"}) do not depend on `keep` past it, so they are cached next to the
    aligned mixers, step by step (a killed run resumes), and a lower fraction extends the cached ones."""
    folder = aligned_dir(ctx.recipe, ctx.teacher)
    path = folder / f"greedy-{ctx.recipe.selection.score_rows}rows.json"
    steps = json.loads(path.read_text()) if path.is_file() else []
    mixers = {i: layer.mamba for i, layer in enumerate(student.model.layers)}
    rows = scored_rows(ctx)
    while len(mixers) - len(steps) > keep:
        swapped = [step["layer"] for step in steps]
        candidates = [i for i in mixers if i not in swapped]
        started = time.perf_counter()
        scores = [single[i] for i in candidates] if not steps else swap_scores(
            ctx.accelerator, ctx.teacher, mixers, rows, batch_size=4, candidates=candidates, swapped=swapped)
        best = min(zip(scores, candidates))
        steps.append({"layer": best[1], "kl": best[0], "scores": dict(zip(map(str, candidates), scores)),
                      "seconds": time.perf_counter() - started})
        logger.info("selection (greedy): layer %d becomes Mamba (KL %.4f with %d swapped, %.0f s)", best[1],
                    best[0], len(steps), steps[-1]["seconds"])
        if ctx.accelerator.is_main_process:
            write_text(path, json.dumps(steps))
    return steps[: len(mixers) - keep]


def uniform_layers(num_layers: int, fraction: float) -> list[int]:
    from distill.init import select_attention_layers

    if not round(fraction * num_layers):
        return []
    return select_attention_layers(num_layers, attention_fraction=fraction)


def record(recipe, summary: dict, greedy: list[dict] | None = None) -> dict:
    """The choice of attention layers from the selection stage's summary and, for `method: greedy`, the greedy
    steps (`selection/scores.json`)."""
    scores, fraction = summary["scores"], recipe.student.attention_fraction
    swapped = {step["layer"] for step in greedy or []}
    chosen = choose(scores, fraction)
    if greedy is not None:
        chosen = [i for i in range(len(scores)) if i not in swapped]
    return {"attention_layers": chosen, "fraction": fraction, "method": recipe.selection.method,
            "scores": scores,
            "single_layers": choose(scores, fraction), "greedy": greedy,
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
        keep = round(recipe.student.attention_fraction * len(summary["scores"]))
        # with no attention to keep there is nothing to choose
        greedy = None
        if recipe.selection.method == "greedy" and keep:
            greedy = greedy_steps(ctx, aligned, summary["scores"], keep)
        choice = record(recipe, summary, greedy)
        if ctx.accelerator.is_main_process:
            write_text(layout.selection_record, json.dumps(choice, indent=2))
            plot_selection(choice, layout.selection / "scores.png")
        logger.info("selection (%s): attention kept at %s (single-swap scores would keep %s, uniform "
                    "placement %s)", choice["method"], choice["attention_layers"], choice["single_layers"],
                    choice["uniform_layers"])
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
