"""Supervised fine-tuning: cross-entropy on the data's assistant tokens, plus `kl_weight` times the divergence
to the teacher's next-token distribution (MambaInLlama's first stage trains on the teacher's own answers with
CE + 0.1 KL; `data.answers: teacher` gives those answers). Both terms are summed per loss token.
"""

from __future__ import annotations

import torch

from distill.data import loss_positions, model_inputs
from distill.kl import online_teacher
from distill.losses import distill_kl
from distill.trainer import held_out_losses, set_trainable
from distill.trainer import train as train_loop


class SftObjective(torch.nn.Module):
    def __init__(self, student, cfg):
        super().__init__()
        self.student, self.cfg = student, cfg

    def loss_tokens(self, batch: dict) -> torch.Tensor:
        return loss_positions(batch["labels"]).sum()

    def forward(self, batch: dict, teacher_out: dict) -> dict:
        hidden = self.student.model(**model_inputs(batch)).last_hidden_state
        cfg = self.cfg
        loss = distill_kl(
            hidden,
            teacher_out.get("hidden"),
            loss_positions(batch["labels"]),
            student_head=self.student.lm_head.weight,
            teacher_head=teacher_out.get("head"),
            kind=cfg.kl,
            temperature=cfg.temperature,
            jsd_beta=cfg.jsd_beta,
            ce_weight=1.0,
            labels=batch["labels"],
            chunk=cfg.kl_chunk_tokens,
            reduction="sum",
            kl_weight=cfg.kl_weight,
        )
        return {"loss": loss}


def train(ctx, cfg, student, stage_dir):
    """Fine-tune `student` on the training rows' targets; returns (student, summary)."""
    ctx.teacher.requires_grad_(False)
    set_trainable(student, cfg.trainable)
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    objective = SftObjective(student, cfg)
    step = online_teacher(ctx.accelerator, ctx.teacher) if cfg.kl_weight else None

    def held_out():
        if not cfg.held_out_rows:
            return None
        return held_out_losses(ctx.accelerator, objective, step, ctx.held_out, cfg, cfg.held_out_rows)

    before = held_out()
    summary = train_loop(ctx, stage_dir, cfg, objective, teacher_step=step)
    summary.update(held_out_before=before, held_out_after=held_out())
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_disable()
    student.requires_grad_(False)
    return student, summary
