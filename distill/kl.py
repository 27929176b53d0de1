"""KL distillation: the student's next-token distribution is trained towards the teacher's (what the
`end_to_end` and `stepwise` stages train).

The loss (`distill.losses.distill_kl`) is a forward KL, reverse KL or generalised JSD at a temperature,
optionally plus cross-entropy, averaged over loss tokens. The teacher runs outside the trained module under
`torch.inference_mode` (in the recipe's autocast precision) and hands over its final hidden states, which
the loss projects through its `lm_head` chunk by chunk; or, with `teacher_logits: topk`, its top-k
log-probs are read from a disk cache filled on first use and reused across epochs and runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from distill.assets import cache_root
from distill.data import loss_positions, model_inputs
from distill.errors import TrainingError
from distill.losses import TopK, distill_kl
from distill.modeling_hybrid import is_mixer_param
from distill.trainer import held_out_losses, set_trainable, train


def with_lora(student, lora):
    """Wrap with peft LoRA on `lora.target_modules`, keeping the Mamba mixers fully trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules)
    try:
        model = get_peft_model(student, config)
    except ValueError as err:
        first = str(err).splitlines()[0]
        raise TrainingError(f"lora.target_modules = {lora.target_modules}: {first}") from None
    for name, param in model.named_parameters():
        if is_mixer_param(name):
            param.requires_grad_(True)
    return model


class KLObjective(torch.nn.Module):
    """Student forward to the final hidden states, then the chunked divergence to the teacher's."""

    def __init__(self, student, cfg):
        super().__init__()
        self.student, self.cfg = student, cfg

    @property
    def lm(self):
        """The causal LM under any peft wrapper (it has `.model` and `.lm_head`)."""
        return self.student.get_base_model() if hasattr(self.student, "get_base_model") else self.student

    def loss_tokens(self, batch: dict) -> torch.Tensor:
        return loss_positions(batch["labels"]).sum()

    def forward(self, batch: dict, teacher_out: dict) -> dict:
        hidden = self.lm.model(**model_inputs(batch)).last_hidden_state
        cfg = self.cfg
        loss = distill_kl(
            hidden,
            teacher_out.get("topk", teacher_out.get("hidden")),  # neither: cross-entropy alone (sft)
            loss_positions(batch["labels"]),
            student_head=self.lm.lm_head.weight,
            teacher_head=teacher_out.get("head"),
            kind=cfg.kl,
            temperature=cfg.temperature,
            jsd_beta=cfg.jsd_beta,
            ce_weight=cfg.ce_weight,
            labels=batch["labels"],
            chunk=cfg.kl_chunk_tokens,
            reduction="sum",
            kl_weight=kl_weight(cfg),
        )
        return {"loss": loss}


def kl_weight(cfg) -> float:
    """The divergence's weight: `sft` sets it beside its cross-entropy; other KL stages train on it alone."""
    return getattr(cfg, "kl_weight", 1.0)


def online_teacher(accelerator, teacher):
    """teacher_step that returns the teacher's final hidden states and its lm_head weight."""

    @torch.inference_mode()
    def step(batch: dict) -> dict:
        with accelerator.autocast():
            hidden = teacher.model(**model_inputs(batch)).last_hidden_state
        return {"hidden": hidden, "head": teacher.lm_head.weight}

    return step


class TopKCache:
    """The teacher's top-k next-token log-probs for every row of a dataset, on disk, filled lazily.

    Rows are computed the first time a batch needs them and reused afterwards (later epochs, later runs:
    the cache key covers the teacher, the dataset fingerprint, k and the temperature).
    """

    def __init__(self, accelerator, teacher, dataset, recipe, k: int, temperature: float):
        self.accelerator, self.teacher, self.temperature, self.k = accelerator, teacher, temperature, k
        length = len(dataset[0]["input_ids"])
        key = json.dumps(
            [recipe.teacher.model_dump(), float(teacher.lm_head.weight.double().sum()),
             getattr(dataset, "_fingerprint", None), len(dataset), length, k, temperature]
        )
        self.dir = cache_root() / "teacher_topk" / hashlib.sha256(key.encode()).hexdigest()[:16]
        shape = (len(dataset), length, k)
        if accelerator.is_main_process and not (self.dir / "done.npy").exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "key.json").write_text(key)
            open_memmap(self.dir / "logprobs.npy", "w+", np.float32, shape).flush()
            open_memmap(self.dir / "indices.npy", "w+", np.int32, shape).flush()
            open_memmap(self.dir / "done.npy", "w+", np.bool_, (len(dataset),)).flush()
        accelerator.wait_for_everyone()
        self.logprobs = open_memmap(self.dir / "logprobs.npy", "r+")
        self.indices = open_memmap(self.dir / "indices.npy", "r+")
        self.done = open_memmap(self.dir / "done.npy", "r+")

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        rows = batch["row"].cpu().numpy()
        todo = ~self.done[rows]
        if todo.any():
            sub = {k: v[torch.as_tensor(todo, device=v.device)] for k, v in batch.items()}
            with self.accelerator.autocast():
                logits = self.teacher(**model_inputs(sub)).logits
            logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            values, indices = logp.topk(self.k, dim=-1)
            self.logprobs[rows[todo]] = values.cpu().numpy()
            self.indices[rows[todo]] = indices.int().cpu().numpy()
            self.logprobs.flush(), self.indices.flush()
            self.done[rows[todo]] = True  # only after the values are on disk
            self.done.flush()
        device = batch["input_ids"].device
        topk = TopK(torch.from_numpy(self.logprobs[rows]).to(device),
                    torch.from_numpy(self.indices[rows]).to(device))
        return {"topk": topk}


def train_kl(ctx, cfg, student, stage_dir: Path, *, max_tokens: int | None = None):
    """Train `student` with the KL objective of `cfg` on `max_tokens` (default `cfg.max_tokens`), seeded by
    `ctx.seed`; returns (student, summary)."""
    ctx.teacher.requires_grad_(False)
    teacher_step = online_teacher(ctx.accelerator, ctx.teacher) if kl_weight(cfg) else None
    trainable = getattr(cfg, "trainable", "mixers")
    set_trainable(student, "all" if trainable == "all" else "mixers")
    model = with_lora(student, cfg.lora) if trainable == "lora" else student
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    objective = KLObjective(model, cfg)
    step = teacher_step
    if getattr(cfg, "teacher_logits", "online") == "topk":
        step = TopKCache(ctx.accelerator, ctx.teacher, ctx.train, ctx.recipe, cfg.topk, cfg.temperature)

    def held_out():  # always the exact, full-vocabulary divergence with the online teacher
        if not cfg.held_out_rows:
            return None
        return held_out_losses(ctx.accelerator, objective, teacher_step, ctx.held_out, cfg, cfg.held_out_rows)

    before = held_out()
    summary = train(ctx, stage_dir, cfg, objective, teacher_step=step, max_tokens=max_tokens)
    summary.update(held_out_before=before, held_out_after=held_out())
    if trainable == "lora":
        student = model.merge_and_unload()
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_disable()
    student.requires_grad_(False)
    return student, summary
