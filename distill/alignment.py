"""Layerwise alignment (MOHAWK's hidden-state alignment): what the `layerwise` and `selection` stages train.

Each Mamba mixer learns to reproduce, on the teacher's own hidden states, the output of the attention it
replaced. One teacher forward with hooks on the replaced layers captures every layer's input and target at
once (the forward stops after the deepest one); since each layer then trains on its own captured input,
the layers are independent and there is no student forward through the stack. Only the mixers train.

`target: block_output` instead runs the student's whole decoder block (norms, mixer, MLP, residuals) on the
teacher block's input and matches the teacher block's output.

`activations: cached` makes alignment tokens cheaper: the teacher forward (about a third of a step) runs once
per row on max_tokens / cache_epochs tokens of rows, whose activations are kept in memory (bf16), and the
mixers train cache_epochs epochs on them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from distill.data import model_inputs
from distill.errors import TrainingError
from distill.losses import alignment_loss
from distill.trainer import held_out_losses, set_trainable, train

logger = logging.getLogger(__name__)


def mamba_layers(student) -> list[int]:
    """Indices of the student's layers whose mixer is a Mamba (the ones distillation trains)."""
    return [i for i, layer in enumerate(student.model.layers) if hasattr(layer, "mamba")]


class _StopForward(Exception):
    """Raised by the hook of the deepest captured layer: nothing above it is needed."""


def capture_teacher(accelerator, teacher, layers: list[int], target: str):
    """teacher_step returning {"inputs": {i: x_i}, "outputs": {i: y_i}} for the given layers.

    mixer_output: x_i is what layer i's attention receives (after input_layernorm), y_i its output.
    block_output: x_i is the decoder block's input, y_i the block's output.
    """

    def step(batch: dict) -> dict:
        inputs, outputs, handles = {}, {}, []

        def hook(index):
            def fn(module, args, kwargs, output):
                inputs[index] = args[0] if args else kwargs["hidden_states"]
                outputs[index] = output[0] if isinstance(output, tuple) else output
                if index == max(layers):
                    raise _StopForward

            return fn

        for i in layers:
            layer = teacher.model.layers[i]
            module = layer.self_attn if target == "mixer_output" else layer
            handles.append(module.register_forward_hook(hook(i), with_kwargs=True))
        # no_grad rather than inference_mode: the captured inputs are saved by the student's autograd graph
        try:
            with torch.no_grad(), accelerator.autocast():
                teacher.model(**model_inputs(batch))
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {"inputs": inputs, "outputs": outputs}

    return step


class ActivationCache:
    """teacher_step for a fixed set of rows: a row's captured activations are kept (bf16, in memory) the
    first time a batch needs it and served from memory afterwards, in the dtype the teacher produced."""

    def __init__(self, capture, num_rows: int, row_bytes: int, max_gb: float):
        need = num_rows * row_bytes / 2**30
        if need > max_gb:
            raise TrainingError(
                f"activations: cached needs {need:.1f} GiB for {num_rows} rows of teacher activations but "
                f"cache_max_gb is {max_gb:g}; raise cache_epochs, raise cache_max_gb, or use "
                "activations: online"
            )
        self.capture, self.rows, self.dtypes = capture, {}, {}

    def __call__(self, batch: dict) -> dict:
        rows = batch["row"].tolist()
        # a batch may hold a row twice (epoch end)
        first = {row: k for k, row in reversed(list(enumerate(rows)))}
        todo = [k for row, k in first.items() if row not in self.rows]
        if todo:
            index = torch.as_tensor(todo, device=batch["input_ids"].device)
            captured = self.capture({key: value[index] for key, value in batch.items()})
            for part, tensors in captured.items():
                for layer, tensor in tensors.items():
                    self.dtypes[part, layer] = tensor.dtype
            for k, position in enumerate(todo):
                self.rows[rows[position]] = {
                    part: {layer: t[k].to(torch.bfloat16, copy=True) for layer, t in tensors.items()}
                    for part, tensors in captured.items()
                }
        parts = self.rows[rows[0]]
        return {
            part: {
                layer: torch.stack([self.rows[row][part][layer] for row in rows]).to(self.dtypes[part, layer])
                for layer in parts[part]
            }
            for part in parts
        }


def cached_rows(train, cfg, seed: int):
    """The training rows whose activations `activations: cached` captures: max_tokens / cache_epochs tokens of
    rows, the first of a seeded permutation (the trainer then visits them cache_epochs times)."""
    tokens = np.asarray(train.with_format("numpy")["attention_mask"]).sum(axis=1)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed)).numpy()
    count = int(np.searchsorted(np.cumsum(tokens[order]), cfg.max_tokens / cfg.cache_epochs)) + 1
    return train.select(sorted(order[: min(count, len(order))].tolist()))


class LayerwiseObjective(torch.nn.Module):
    """Sum over the replaced layers of each layer's per-token alignment error (`cfg.objective`)."""

    def __init__(self, student, layers: list[int], cfg):
        super().__init__()
        self.student, self.layers, self.cfg = student, layers, cfg

    def loss_tokens(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"].sum()

    def forward(self, batch: dict, teacher_out: dict) -> dict:
        mask, position_ids = batch["attention_mask"], batch["position_ids"]
        losses = {}
        for i in self.layers:
            layer, x = self.student.model.layers[i], teacher_out["inputs"][i]
            if self.cfg.target == "mixer_output":
                out = layer.mamba(x, attention_mask=None, position_ids=position_ids)
            else:
                out = layer(x, attention_mask=None, position_ids=position_ids)
            losses[f"layer{i}"] = alignment_loss(
                out, teacher_out["outputs"][i], mask, objective=self.cfg.objective, reduction="sum"
            )
        return {"loss": sum(losses.values()), **losses}


def align(ctx, cfg, student, stage_dir: Path) -> dict:
    """Train every Mamba mixer of `student` towards the teacher layer it replaces (seeded by `ctx.seed`);
    returns the summary."""
    seed, label = ctx.seed, ctx.label
    layers = mamba_layers(student)
    if not layers:
        raise TrainingError("layerwise: the student has no Mamba layers to align; drop the stage or lower "
                            "student.attention_fraction")
    ctx.teacher.requires_grad_(False)
    set_trainable(student, "mixers")
    objective = LayerwiseObjective(student, layers, cfg)
    capture = capture_teacher(ctx.accelerator, ctx.teacher, layers, cfg.target)
    train_ctx, teacher_step = ctx, capture
    if cfg.activations == "cached":
        rows = cached_rows(ctx.train, cfg, seed)
        config = ctx.teacher.config
        row_bytes = 2 * 2 * len(rows[0]["input_ids"]) * config.hidden_size * len(layers)  # in + out, bf16
        teacher_step = ActivationCache(capture, len(rows), row_bytes, cfg.cache_max_gb)
        train_ctx = dataclasses.replace(ctx, train=rows)
        logger.info("%s: teacher activations of %d rows cached (%.2f GiB), %d epochs over them", label,
                    len(rows), len(rows) * row_bytes / 2**30, cfg.cache_epochs)

    def held_out():
        if not cfg.held_out_rows:
            return None
        return held_out_losses(ctx.accelerator, objective, capture, ctx.held_out, cfg, cfg.held_out_rows)

    before = held_out()
    summary = train(train_ctx, stage_dir, cfg, objective, teacher_step=teacher_step)
    summary.update(held_out_before=before, held_out_after=held_out(), layers=layers)
    student.requires_grad_(False)
    return summary
