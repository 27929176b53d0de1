"""Stepwise replacement (the reference's progressive distillation).

Over `num_steps` steps the student's Mamba layers are switched on group by group, in `order` (`top_down`:
deepest layer first; `bottom_up`: shallowest first). At step k the layers not yet switched on still run
the teacher's attention, so the model trained at step k is the student with more attention layers; its
switched-on mixers train end to end (the `end_to_end` KL objective) on max_tokens / num_steps tokens, and
then go back into the student. After the last step every Mamba layer is on: the student's own layout.

Each step is a part of the stage that the stage runner runs in `step{k}/` of the stage's folder, with its own
checkpoints, summary and seed, so a killed stage resumes at the step (and the checkpoint) where it stopped.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from distill.alignment import mamba_layers
from distill.errors import TrainingError
from distill.kl import train_kl
from distill.layout import read_summary
from distill.stages import run


def replacement_schedule(layers: list[int], num_steps: int, order: str) -> list[list[int]]:
    """The Mamba layers switched on after each step: a growing prefix of `layers` in the chosen order."""
    ordered = sorted(layers, reverse=order == "top_down")
    return [sorted(ordered[: math.ceil(len(ordered) * k / num_steps)]) for k in range(1, num_steps + 1)]


def partial_student(student, teacher, active: list[int]):
    """The student with Mamba only on `active` layers; its other Mamba layers get the teacher's attention."""
    from distill.modeling_hybrid import HybridForCausalLM

    config = copy.deepcopy(student.config)
    config.mixer_types = [
        kind if kind == "attention" or i in active else "attention"
        for i, kind in enumerate(config.mixer_types)
    ]
    model = HybridForCausalLM(config).to(student.device)
    borrowed = [i for i, kind in enumerate(student.config.mixer_types)
                if kind != "attention" and i not in active]
    state = {k: v for k, v in student.state_dict().items() if k in model.state_dict()}
    teacher_state = teacher.state_dict()
    for i in borrowed:
        prefix = f"model.layers.{i}.self_attn."
        state.update({k: v for k, v in teacher_state.items() if k.startswith(prefix)})
    model.load_state_dict(state)
    return model


def train(ctx, cfg, student, stage_dir: Path):
    layers = mamba_layers(student)
    if not layers:
        raise TrainingError("stepwise: the student has no Mamba layers to switch on; drop the stage")
    schedule = replacement_schedule(layers, cfg.num_steps, cfg.order)
    per_step = math.ceil(cfg.max_tokens / cfg.num_steps)
    summaries = []
    for k, active in enumerate(schedule, start=1):

        def train_step(step_ctx, cfg, student, step_dir, k=k, active=active):
            model, summary = train_kl(step_ctx, cfg, partial_student(student, ctx.teacher, active), step_dir,
                                      max_tokens=per_step)
            student.load_state_dict({name: value for name, value in model.state_dict().items()
                                     if name in student.state_dict()}, strict=False)
            return student, {**summary, "step": k, "active_layers": active}

        step_dir = stage_dir / f"step{k}"
        student = run(ctx, cfg, student, step_dir, label=f"{ctx.label} step {k}/{cfg.num_steps}",
                      seed=ctx.seed * 1000 + k, train=train_step)
        summaries.append(read_summary(step_dir))
    return student, {
        "tokens": sum(s["tokens"] for s in summaries),
        "steps": sum(s["steps"] for s in summaries),
        "wall_time_s": round(sum(s["wall_time_s"] for s in summaries), 2),
        "final_loss": summaries[-1]["final_loss"],
        "schedule": schedule,
        "held_out_before": summaries[0].get("held_out_before"),
        "held_out_after": summaries[-1].get("held_out_after"),
        "substeps": [{key: s.get(key) for key in ("step", "tokens", "final_loss", "active_layers")}
                     for s in summaries],
    }
