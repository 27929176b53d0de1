"""Stepwise replacement (the reference's progressive distillation).

Over `num_steps` steps the student's Mamba layers are switched on group by group, in `order` (`top_down`:
deepest layer first; `bottom_up`: shallowest first). At step k the layers not yet switched on still run
the teacher's attention, so the model trained at step k is the student with more attention layers; its
switched-on mixers train end to end (the `end_to_end` KL objective) on max_tokens / num_steps tokens, and
then go back into the student. After the last step every Mamba layer is on: the student's own layout.

Each step is a sub-run under `stage{i}-stepwise/step{k}` with its own checkpoints and summary, so a killed
stage resumes at the step (and the checkpoint) where it stopped.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from distill.stages.end_to_end import train_kl
from distill.stages.layerwise import mamba_layers
from distill.trainer import TrainingError, finish, load_final, stage_finished


def replacement_schedule(layers: list[int], num_steps: int, order: str) -> list[list[int]]:
    """The Mamba layers switched on after each step: a growing prefix of `layers` in the chosen order."""
    ordered = sorted(layers, reverse=order == "top_down")
    return [sorted(ordered[: math.ceil(len(ordered) * k / num_steps)]) for k in range(1, num_steps + 1)]


def partial_student(student, teacher, active: list[int]):
    """The student with Mamba only on `active` layers; the other Mamba layers get back the teacher's attention."""
    from distill.modeling_hybrid import HybridForCausalLM

    config = copy.deepcopy(student.config)
    config.mixer_types = [
        kind if kind == "attention" or i in active else "attention" for i, kind in enumerate(config.mixer_types)
    ]
    model = HybridForCausalLM(config).to(student.device)
    borrowed = [i for i, kind in enumerate(student.config.mixer_types) if kind != "attention" and i not in active]
    state = {k: v for k, v in student.state_dict().items() if k in model.state_dict()}
    teacher_state = teacher.state_dict()
    for i in borrowed:
        prefix = f"model.layers.{i}.self_attn."
        state.update({k: v for k, v in teacher_state.items() if k.startswith(prefix)})
    model.load_state_dict(state)
    return model


def run(ctx, index: int, cfg, student):
    stage_dir = Path(ctx.output_dir) / f"stage{index}-{cfg.name}"
    if stage_finished(stage_dir):
        return load_final(student, stage_dir)
    layers = mamba_layers(student)
    if not layers:
        raise TrainingError("stepwise: the student has no Mamba layers to switch on; drop the stage")
    schedule = replacement_schedule(layers, cfg.num_steps, cfg.order)
    per_step = math.ceil(cfg.max_tokens / cfg.num_steps)
    summaries = []
    for k, active in enumerate(schedule, start=1):
        step_dir = stage_dir / f"step{k}"
        if done := stage_finished(step_dir):
            student = load_final(student, step_dir)
            summaries.append(done)
            continue
        model = partial_student(student, ctx.teacher, active)
        model, summary = train_kl(
            ctx, step_dir, cfg, model, max_tokens=per_step, seed=ctx.recipe.seed + index * 1000 + k,
            label=f"stage {index} ({cfg.name}) step {k}/{cfg.num_steps}",
        )
        student.load_state_dict({k_: v for k_, v in model.state_dict().items() if k_ in student.state_dict()},
                                strict=False)
        summary.update(step=k, active_layers=active)
        finish(ctx.accelerator, step_dir, student, summary)
        summaries.append(summary)
    summary = {
        "name": cfg.name,
        "index": index,
        "tokens": sum(s["tokens"] for s in summaries),
        "steps": sum(s["steps"] for s in summaries),
        "wall_time_s": round(sum(s["wall_time_s"] for s in summaries), 2),
        "final_loss": summaries[-1]["final_loss"],
        "schedule": schedule,
        "held_out_before": summaries[0].get("held_out_before"),
        "held_out_after": summaries[-1].get("held_out_after"),
        "substeps": [{k: s.get(k) for k in ("step", "tokens", "final_loss", "active_layers")} for s in summaries],
    }
    finish(ctx.accelerator, stage_dir, student, summary)
    return student

