"""Layerwise alignment (MOHAWK's hidden-state alignment; the reference's frozen-MLP stage).

Each Mamba mixer learns to reproduce, on the teacher's own hidden states, the output of the attention it
replaced. One teacher forward with hooks on the replaced layers captures every layer's input and target at
once (the forward stops after the deepest one); since each layer then trains on its own captured input,
the layers are independent and there is no student forward through the stack. Only the mixers train.

`target: block_output` instead runs the student's whole decoder block (norms, mixer, MLP, residuals) on the
teacher block's input and matches the teacher block's output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.losses import alignment_mse
from distill.stages.end_to_end import model_inputs, set_trainable
from distill.trainer import TrainingError, evaluate, finish, load_final, stage_finished, train


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


class LayerwiseObjective(torch.nn.Module):
    """Sum over the replaced layers of the per-token MSE between the student's and the teacher's outputs."""

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
            losses[f"layer{i}"] = alignment_mse(
                out, teacher_out["outputs"][i], mask, normalize=self.cfg.normalize, reduction="sum"
            )
        return {"loss": sum(losses.values()), **losses}


def run(ctx, index: int, cfg, student):
    stage_dir = Path(ctx.output_dir) / f"stage{index}-{cfg.name}"
    if stage_finished(stage_dir):
        return load_final(student, stage_dir)
    layers = mamba_layers(student)
    if not layers:
        raise TrainingError("layerwise: the student has no Mamba layers to align; drop the stage or lower "
                            "student.attention_fraction")
    ctx.teacher.requires_grad_(False)
    set_trainable(student, "mixers")
    objective = LayerwiseObjective(student, layers, cfg)
    teacher_step = capture_teacher(ctx.accelerator, ctx.teacher, layers, cfg.target)

    def held_out():
        if not cfg.held_out_rows:
            return None
        return evaluate(ctx.accelerator, objective, teacher_step, ctx.held_out, cfg, cfg.held_out_rows)

    before = held_out()
    summary = train(ctx, stage_dir, cfg, objective, teacher_step=teacher_step, seed=ctx.recipe.seed + index,
                    label=f"stage {index} ({cfg.name})")
    summary.update(held_out_before=before, held_out_after=held_out(), layers=layers)
    student.requires_grad_(False)
    finish(ctx.accelerator, stage_dir, student, {"name": cfg.name, "index": index, **summary})
    return student
