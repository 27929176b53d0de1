"""Direct preference optimisation (Rafailov et al., 2023), the sigmoid loss with `beta`.

Each row packs a pair as two documents, prompt + chosen answer then prompt + rejected answer (positions
restart, so neither sees the other), with the answers as targets; the loss is per pair. The reference is the
student as it enters the stage (default) or the teacher (MambaInLlama's variant); its summed answer log-probs
are computed once and saved in the stage folder with the pairs, so no second student sits in memory and a
resumed run uses the very same pairs and references.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distill.data import COLUMNS, _row, loss_positions, model_inputs
from distill.files import atomic_file
from distill.generation import exchanges, padding_id, require_exchanges
from distill.losses import dpo_loss, target_logprobs
from distill.pairs import TEACHER_VS_STUDENT, Pair, check_vocabulary, load_pairs, teacher_vs_student
from distill.trainer import batches, set_trainable
from distill.trainer import train as train_loop


def answer_logprobs(model, batch: dict, chunk: int = 1024) -> torch.Tensor:
    """(B, 2): the summed log-probs of each row's chosen (first document) and rejected (second) answer."""
    hidden = model.model(**model_inputs(batch)).last_hidden_state
    mask = loss_positions(batch["labels"])
    targets = batch["input_ids"][:, 1:][mask[:, :-1]]
    logp = target_logprobs(hidden[mask], model.lm_head.weight, targets, chunk)
    side = ((batch["position_ids"] == 0).cumsum(-1) - 1)[mask]  # 0: chosen document, 1: rejected
    row = torch.arange(len(hidden), device=hidden.device)[:, None].expand_as(mask)[mask]
    sums = torch.zeros(len(hidden) * 2, device=hidden.device, dtype=logp.dtype)
    return sums.index_add(0, row * 2 + side, logp).view(-1, 2)


def pair_rows(pairs: list[Pair], max_length: int, pad_id: int):
    """One row per pair; each side's answer is cut so prompt + answer fit max_length. The rows are as wide as
    the longest pair, not 2 * max_length: every padding position costs a forward and a backward."""
    from datasets import Dataset, Features, Sequence, Value

    packed = []
    for pair in pairs:
        prompt = pair.prompt[-(max_length // 2) :]  # the prompt's end (the question) matters most
        sides = [(prompt + answer)[:max_length] for answer in (pair.chosen, pair.rejected)]
        masks = [
            ([0] * len(prompt) + [1] * len(answer))[:max_length] for answer in (pair.chosen, pair.rejected)
        ]
        packed.append(list(zip(sides, masks)))
    width = max(sum(len(side) for side, _ in docs) for docs in packed)
    rows = [_row(docs, width, pad_id) for docs in packed]
    return Dataset.from_list(rows, features=Features({c: Sequence(Value("int64")) for c in COLUMNS}))


class DpoObjective(torch.nn.Module):
    def __init__(self, student, cfg):
        super().__init__()
        self.student, self.cfg = student, cfg

    def loss_tokens(self, batch: dict) -> torch.Tensor:
        return torch.tensor(len(batch["input_ids"]), device=batch["input_ids"].device)  # the loss is per pair

    def forward(self, batch: dict, teacher_out: dict) -> dict:
        policy = answer_logprobs(self.student, batch)
        reference = teacher_out["reference"]
        loss = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], self.cfg.beta)
        margin = (policy - reference).detach()
        reward = self.cfg.beta * (margin[:, 0] - margin[:, 1])
        return {"loss": loss.sum(), "reward_margin": reward.sum(), "accuracy": (reward > 0).float().sum()}


def build_pairs(ctx, cfg, student, seed: int) -> list[Pair]:
    pad_id = padding_id(ctx.teacher, ctx.tokenizer)
    if cfg.pairs == TEACHER_VS_STUDENT:
        found = require_exchanges(exchanges(ctx.train, cfg.max_prompt_tokens), "dpo", cfg.max_prompt_tokens)
        with ctx.accelerator.autocast():
            pairs = teacher_vs_student(
                ctx.teacher,
                student,
                found[: cfg.max_pairs],
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.sample_temperature,
                seed=seed,
                pad_id=pad_id,
                batch_size=cfg.batch_size,
            )
    else:
        pairs = load_pairs(cfg.pairs, cfg.pairs_split, ctx.tokenizer, cfg.max_pairs)
    check_vocabulary(pairs, student.config.vocab_size, cfg.pairs)
    return pairs


@torch.no_grad()
def reference_logprobs(ctx, cfg, model, rows) -> torch.Tensor:
    sums = []
    for batch in batches(rows, cfg.batch_size, ctx.accelerator.device):
        with ctx.accelerator.autocast():
            sums.append(answer_logprobs(model, batch).float().cpu())
    return torch.cat(sums)


def train(ctx, cfg, student, stage_dir):
    """Train `student` on preference pairs; returns (student, summary)."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx.teacher.requires_grad_(False)
    student.requires_grad_(False)
    saved = stage_dir / "pairs.pt"
    if saved.is_file():  # a resumed run: the pairs and references computed when the stage started
        stored, reference = torch.load(saved, weights_only=False)
        pairs = [Pair(**p) for p in stored]
    else:
        pairs = build_pairs(ctx, cfg, student, ctx.seed)
        model = student if cfg.reference == "student" else ctx.teacher
        reference = reference_logprobs(
            ctx, cfg, model, pair_rows(pairs, cfg.max_length, padding_id(ctx.teacher, ctx.tokenizer))
        )
        if ctx.accelerator.is_main_process:
            with atomic_file(saved) as tmp:
                torch.save(([vars(p) for p in pairs], reference), tmp)
    rows = pair_rows(pairs, cfg.max_length, padding_id(ctx.teacher, ctx.tokenizer))
    set_trainable(student, cfg.trainable)
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    objective = DpoObjective(student, cfg)

    def step(batch: dict) -> dict:
        return {"reference": reference.to(batch["row"].device)[batch["row"]]}

    summary = train_loop(dataclasses.replace(ctx, train=rows), stage_dir, cfg, objective, teacher_step=step)
    chosen_better = float((reference[:, 0] > reference[:, 1]).float().mean())
    summary.update(pairs=len(rows), reference=cfg.reference, reference_prefers_chosen=chosen_better)
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_disable()
    student.requires_grad_(False)
    return student, summary
