"""On-policy distillation (GKD, Agarwal et al. 2024): the student answers the data's prompts, the teacher
scores every sampled token in one forward, and the loss is a per-token divergence on the answer tokens only.

A teacher-forced student never conditions on its own mistakes during training; here it trains exactly where
it goes at generation time. Reverse KL (the default) is mode-seeking: the student is pushed off tokens the
teacher finds unlikely rather than made to cover all of the teacher's mass. With `lmbda` < 1, a seeded
fraction 1 - lmbda of the steps train on the data's own answers instead (GKD's mix).

Rows are the data's first exchanges (prompt, then the data's answer), one per row. The budget counts answer
slots, `max_new_tokens` per prompt, and the summed loss is divided by that slot count, so a step's weight does
not depend on how early its samples stopped. Samples are drawn from a generator seeded by the stage seed,
the step and the rows (see `distill.generation.step_generator`), so a resumed run draws the same ones.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F

from distill.data import loss_positions
from distill.generation import (
    answer_labels,
    exchanges,
    forward_inputs,
    padding_id,
    require_exchanges,
    sample,
    step_generator,
)
from distill.losses import distill_kl
from distill.trainer import held_out_losses, set_trainable
from distill.trainer import train as train_loop


def exchange_rows(found, max_prompt_tokens: int, max_new_tokens: int, pad_id: int):
    """One right-padded row per exchange: the prompt, then the data's answer cut to max_new_tokens
    (the targets)."""
    from datasets import Dataset

    width = max_prompt_tokens + max_new_tokens
    columns = {"input_ids": [], "attention_mask": [], "position_ids": [], "labels": []}
    for ex in found:
        answer = ex.answer[:max_new_tokens]
        ids, pad = ex.prompt + answer, width - len(ex.prompt) - len(answer)
        columns["input_ids"].append(ids + [pad_id] * pad)
        columns["attention_mask"].append([1] * len(ids) + [0] * pad)
        columns["position_ids"].append(list(range(len(ids))) + list(range(pad)))
        columns["labels"].append([-100] * len(ex.prompt) + answer + [-100] * pad)
    return Dataset.from_dict(columns)


def prompts_of(batch: dict) -> list[list[int]]:
    """Each row's prompt: its tokens before the first target."""
    first = (batch["labels"] != -100).int().argmax(-1)
    return [ids[: int(n)].tolist() for ids, n in zip(batch["input_ids"].cpu(), first.cpu())]


def teacher_nll(hidden: torch.Tensor, head: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
    """The teacher's summed NLL of the target tokens (at temperature 1) and their count."""
    mask = loss_positions(labels)
    logits = hidden[mask].float() @ head.float().T
    targets = input_ids[:, 1:][mask[:, :-1]]
    return F.cross_entropy(logits, targets, reduction="sum"), mask.sum()


class OnPolicyObjective(torch.nn.Module):
    """The student's divergence to the teacher on the sequences the teacher step built (sampled or data)."""

    def __init__(self, student, cfg):
        super().__init__()
        self.student, self.cfg = student, cfg

    def loss_tokens(self, batch: dict) -> torch.Tensor:
        return torch.tensor(
            len(batch["input_ids"]) * self.cfg.max_new_tokens, device=batch["input_ids"].device
        )

    def forward(self, batch: dict, teacher_out: dict) -> dict:
        seq, mask, labels = teacher_out["input_ids"], teacher_out["attention_mask"], teacher_out["labels"]
        hidden = self.student.model(**forward_inputs(seq, mask)).last_hidden_state
        cfg = self.cfg
        loss = distill_kl(
            hidden,
            teacher_out["hidden"],
            loss_positions(labels),
            student_head=self.student.lm_head.weight,
            teacher_head=teacher_out["head"],
            kind=cfg.kl,
            temperature=cfg.temperature,
            jsd_beta=cfg.jsd_beta,
            ce_weight=cfg.ce_weight,
            labels=labels,
            chunk=cfg.kl_chunk_tokens,
            reduction="sum",
        )
        slots = self.loss_tokens(batch)
        count = teacher_out["answer_tokens"].clamp(min=1)
        # per-token means of this micro-batch, scaled like the loss so the log shows per-token values
        return {
            "loss": loss,
            "teacher_nll": teacher_out["teacher_nll"] / count * slots,
            "answer_length": teacher_out["answer_tokens"] * self.cfg.max_new_tokens,
            "sampled": torch.tensor(float(teacher_out["sampled"]), device=loss.device) * slots,
        }


def teacher_step(accelerator, teacher, student, cfg, seed: int, pad_id: int):
    """Build each micro-batch's sequences (the student's samples, or the data's answers on the steps the
    `lmbda` draw leaves to fixed data), then run the teacher over them once."""

    @torch.no_grad()
    def step(batch: dict) -> dict:
        # held-out evaluation has no step: it always samples, with seeds fixed by the rows
        index = int(batch["step"][0]) if "step" in batch else -1
        on_policy = cfg.lmbda == 1 or random.Random(f"{seed}-{index}").random() < cfg.lmbda
        if on_policy:
            generator = step_generator(seed, index, batch["row"], batch["input_ids"].device)
            with accelerator.autocast():
                seq, mask, answer = sample(
                    student,
                    prompts_of(batch),
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.sample_temperature,
                    generator=generator,
                    pad_id=pad_id,
                )
            labels = answer_labels(seq, answer)
        else:
            seq, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        with accelerator.autocast():
            hidden = teacher.model(**forward_inputs(seq, mask)).last_hidden_state
        nll, count = teacher_nll(hidden, teacher.lm_head.weight, seq, labels)
        return {
            "input_ids": seq,
            "attention_mask": mask,
            "labels": labels,
            "hidden": hidden,
            "head": teacher.lm_head.weight,
            "teacher_nll": nll,
            "answer_tokens": count.float(),
            "sampled": on_policy,
        }

    return step


def train(ctx, cfg, student, stage_dir):
    """Train `student` on its own samples scored by the teacher; returns (student, summary)."""
    ctx.teacher.requires_grad_(False)
    pad_id = padding_id(ctx.teacher, ctx.tokenizer)
    found = require_exchanges(exchanges(ctx.train, cfg.max_prompt_tokens), "on_policy", cfg.max_prompt_tokens)
    rows = exchange_rows(found, cfg.max_prompt_tokens, cfg.max_new_tokens, pad_id)
    held = exchanges(ctx.held_out, cfg.max_prompt_tokens)
    held_rows = exchange_rows(held, cfg.max_prompt_tokens, cfg.max_new_tokens, pad_id) if held else None
    set_trainable(student, cfg.trainable)
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    objective = OnPolicyObjective(student, cfg)
    step = teacher_step(ctx.accelerator, ctx.teacher, student, cfg, ctx.seed, pad_id)

    def held_out():  # the divergence and teacher NLL on the student's samples of held-out prompts
        if not cfg.held_out_rows or held_rows is None:
            return None
        return held_out_losses(ctx.accelerator, objective, step, held_rows, cfg, cfg.held_out_rows)

    before = held_out()
    summary = train_loop(
        dataclasses.replace(ctx, train=rows),
        stage_dir,
        cfg,
        objective,
        teacher_step=step,
        row_tokens=[cfg.max_new_tokens] * len(rows),
    )
    summary.update(held_out_before=before, held_out_after=held_out(), prompts=len(rows))
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_disable()
    student.requires_grad_(False)
    return student, summary
