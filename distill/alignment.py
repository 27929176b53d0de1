"""Layerwise alignment (MOHAWK's hidden-state alignment): what the `layerwise` and `selection` stages train.

Each Mamba mixer learns to reproduce, on the teacher's own hidden states, the output of the attention it
replaced. One teacher forward with hooks on the replaced layers captures every layer's input and target at
once (the forward stops after the deepest one); since each layer then trains on its own captured input,
the layers are independent and there is no student forward through the stack (except with `inputs:
student`, below). Only the mixers train.

`target: block_output` instead runs the student's whole decoder block (norms, mixer, MLP, residuals) on the
teacher block's input and matches the teacher block's output. With `inputs: student` each block runs on the
student's own hidden states instead: one student forward through the stack, each Mamba block's input
detached so that its gradient stays in the block. A block then learns to map what the (imperfect) layers below
it actually give it to the teacher's output, so errors stop compounding through the replaced layers; the
teacher's block outputs are the only activations captured (or cached).

`activations: cached` makes alignment tokens cheaper: the teacher forward (about a third of a step) runs once
per row on max_tokens / cache_epochs tokens of rows, whose activations are kept (bf16) and the mixers train
cache_epochs epochs on them. `cache_storage: memory` keeps them in RAM; `disk` in a memory-mapped file, so
more distinct rows (fewer epochs) fit than RAM holds; both feed the mixers the same bits.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from distill.data import model_inputs
from distill.errors import TrainingError
from distill.files import atomic_file, write_text
from distill.losses import alignment_loss
from distill.trainer import held_out_losses, set_trainable, train

logger = logging.getLogger(__name__)


def mamba_layers(student) -> list[int]:
    """Indices of the student's layers whose mixer is a Mamba (the ones distillation trains)."""
    return [i for i, layer in enumerate(student.model.layers) if hasattr(layer, "mamba")]


class _StopForward(Exception):
    """Raised by the hook of the deepest captured layer: nothing above it is needed."""


def forward_to_deepest(forward, modules: dict[int, torch.nn.Module], record, before=None) -> None:
    """Run `forward()` with a forward hook on each module that calls `record(index, args, kwargs, output)`,
    stopping the forward after the deepest one; `before`, if given, is each module's forward pre-hook."""
    deepest, handles = max(modules), []

    def hook(index):
        def fn(module, args, kwargs, output):
            record(index, args, kwargs, output)
            if index == deepest:
                raise _StopForward

        return fn

    for index, module in modules.items():
        if before is not None:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(hook(index), with_kwargs=True))
    try:
        forward()
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def capture_teacher(accelerator, teacher, layers: list[int], target: str, parts=("inputs", "outputs")):
    """teacher_step returning {"inputs": {i: x_i}, "outputs": {i: y_i}} (the `parts` asked) for the layers.

    mixer_output: x_i is what layer i's attention receives (after input_layernorm), y_i its output.
    block_output: x_i is the decoder block's input, y_i the block's output.
    """

    modules = {i: teacher.model.layers[i].self_attn if target == "mixer_output" else teacher.model.layers[i]
               for i in layers}

    def step(batch: dict) -> dict:
        captured = {part: {} for part in parts}

        def record(index, args, kwargs, output):
            if "inputs" in parts:
                captured["inputs"][index] = args[0] if args else kwargs["hidden_states"]
            captured["outputs"][index] = output[0] if isinstance(output, tuple) else output

        def forward():
            # no_grad, not inference_mode: the captured inputs are saved by the student's autograd graph
            with torch.no_grad(), accelerator.autocast():
                teacher.model(**model_inputs(batch))

        forward_to_deepest(forward, modules, record)
        return captured

    return step


class ActivationCache:
    """teacher_step for a fixed set of rows (`batch["row"]` indexes them): a row's captured activations are
    stored (bf16) the first time a batch needs it and read back afterwards, in the dtype the teacher produced.
    `store` keeps them: `MemoryStore` or `DiskStore`, which give bit-identical batches."""

    def __init__(self, capture, store):
        self.capture, self.store = capture, store

    def __call__(self, batch: dict) -> dict:
        rows = batch["row"].tolist()
        # a batch may hold a row twice (epoch end)
        first = {row: k for k, row in reversed(list(enumerate(rows)))}
        todo = [first[row] for row in self.store.missing(list(first))]
        if todo:
            index = torch.as_tensor(todo, device=batch["input_ids"].device)
            captured = self.capture({key: value[index] for key, value in batch.items()})
            self.store.put([rows[k] for k in todo], captured)
        return self.store.get(rows, batch["input_ids"].device)


class MemoryStore:
    """Captured activations kept in memory (bf16); refused up front when they would exceed `max_gb`."""

    def __init__(self, num_rows: int, row_bytes: int, max_gb: float):
        need = num_rows * row_bytes / 2**30
        if need > max_gb:
            raise TrainingError(
                f"activations: cached needs {need:.1f} GiB for {num_rows} rows of teacher activations but "
                f"cache_max_gb is {max_gb:g}; raise cache_epochs, raise cache_max_gb, set cache_storage: "
                "disk, or use activations: online"
            )
        self.rows: dict[int, dict] = {}
        self.dtypes: dict[tuple[str, int], torch.dtype] = {}

    def missing(self, rows: list[int]) -> list[int]:
        return [row for row in rows if row not in self.rows]

    def put(self, rows: list[int], captured: dict) -> None:
        for part, tensors in captured.items():
            self.dtypes.update({(part, layer): t.dtype for layer, t in tensors.items()})
        for k, row in enumerate(rows):
            self.rows[row] = {
                part: {layer: t[k].to(torch.bfloat16, copy=True) for layer, t in tensors.items()}
                for part, tensors in captured.items()
            }

    def get(self, rows: list[int], device) -> dict:
        return {
            part: {
                layer: torch.stack([self.rows[row][part][layer] for row in rows]).to(
                    device, self.dtypes[part, layer])
                for layer in tensors
            }
            for part, tensors in self.rows[rows[0]].items()
        }


class DiskStore:
    """Captured activations in one memory-mapped file of bf16 (`activations.bin`: rows x slots x seq x hidden,
    a slot per (part, layer)), so a cache larger than RAM pages in and out as the OS sees fit.

    The file is allocated in full up front, so a full disk is refused then rather than midway (a write into an
    unbacked page of a mapping is a SIGBUS, not an exception). A row counts as stored only once its bytes are
    flushed and `filled.npy` (replaced atomically) says so: a killed run resumes with the rows it had stored
    and captures the others again. `meta.json` says what the file holds; a folder that holds anything else is
    started afresh."""

    def __init__(self, folder: Path, num_rows: int, slots: list[tuple[str, int]], seq: int, hidden: int,
                 key: dict):
        self.folder, self.slots = Path(folder), slots
        shape = (num_rows, len(slots), seq, hidden)
        meta = {**key, "shape": list(shape), "slots": [list(slot) for slot in slots]}
        data, meta_path = self.folder / "activations.bin", self.folder / "meta.json"
        self.filled_path, self.dtypes_path = self.folder / "filled.npy", self.folder / "dtypes.json"
        need = 2 * int(np.prod(shape))
        try:
            fresh = not (meta_path.is_file() and json.loads(meta_path.read_text()) == meta
                         and data.is_file() and data.stat().st_size == need)
            if fresh:
                if self.folder.is_dir():
                    shutil.rmtree(self.folder)
                self.folder.mkdir(parents=True)
                free = shutil.disk_usage(self.folder).free
                if free < need:
                    raise OSError(errno.ENOSPC, f"only {free / 2**30:.2f} GiB free")
                with open(data, "wb") as f:
                    os.posix_fallocate(f.fileno(), 0, need)
                # last: the file is complete (allocated) once this exists
                write_text(meta_path, json.dumps(meta))
            self.data = np.memmap(data, dtype=np.int16, mode="r+", shape=shape)
        except OSError as err:
            raise TrainingError(
                f"cache_storage: disk cannot keep {need / 2**30:.2f} GiB of teacher activations in "
                f"{self.folder} ({err.strerror or err}); set cache_dir to a writable folder on a disk with "
                "room, or use cache_storage: memory"
            ) from None
        self.filled = np.zeros(num_rows, dtype=bool)
        self.dtypes: dict[tuple[str, int], torch.dtype] = {}
        if not fresh and self.filled_path.is_file() and self.dtypes_path.is_file():
            self.filled = np.unpackbits(np.load(self.filled_path), count=num_rows).astype(bool)
            self.dtypes = {(part, layer): getattr(torch, name)
                           for part, layer, name in json.loads(self.dtypes_path.read_text())}
        logger.info("activation cache %s: %d of %d rows stored", self.folder, int(self.filled.sum()),
                    num_rows)

    def missing(self, rows: list[int]) -> list[int]:
        return [row for row in rows if not self.filled[row]]

    def put(self, rows: list[int], captured: dict) -> None:
        if not self.dtypes:
            self.dtypes = {slot: captured[slot[0]][slot[1]].dtype for slot in self.slots}
            write_text(self.dtypes_path, json.dumps([[*slot, str(dtype).removeprefix("torch.")]
                                                     for slot, dtype in self.dtypes.items()]))
        block = torch.stack([captured[part][layer] for part, layer in self.slots], dim=1)
        self.data[np.asarray(rows)] = block.to("cpu", torch.bfloat16).view(torch.int16).numpy()
        self.data.flush()  # the bytes reach the file before the record says the rows are there
        self.filled[rows] = True
        with atomic_file(self.filled_path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.packbits(self.filled))

    def get(self, rows: list[int], device) -> dict:
        block = torch.from_numpy(self.data[np.asarray(rows)]).view(torch.bfloat16).to(device)
        out: dict[str, dict] = {}
        for s, (part, layer) in enumerate(self.slots):
            out.setdefault(part, {})[layer] = block[:, s].to(self.dtypes[part, layer]).contiguous()
        return out


def cached_rows(train, cfg, seed: int):
    """The training rows whose activations `activations: cached` captures: max_tokens / cache_epochs tokens of
    rows, the first of a seeded permutation (the trainer then visits them cache_epochs times)."""
    tokens = np.asarray(train.with_format("numpy")["attention_mask"]).sum(axis=1)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed)).numpy()
    count = int(np.searchsorted(np.cumsum(tokens[order]), cfg.max_tokens / cfg.cache_epochs)) + 1
    return train.select(sorted(order[: min(count, len(order))].tolist()))


def captured_parts(cfg) -> tuple[str, ...]:
    """What the teacher step hands the objective: each layer's input and target, or (`inputs: student`) the
    target alone."""
    return ("outputs",) if cfg.inputs == "student" else ("inputs", "outputs")


def activation_bytes(ctx, cfg, rows, layers: list[int]) -> int:
    """The bytes the cached activations of `rows` take: each layer's captured parts, bf16."""
    per_row_layer = 2 * len(captured_parts(cfg)) * len(rows[0]["input_ids"]) * ctx.teacher.config.hidden_size
    return per_row_layer * len(rows) * len(layers)


def activation_store(ctx, cfg, rows, layers: list[int], stage_dir: Path):
    """Where `activations: cached` keeps the activations of `rows`: in memory, or in a memory-mapped file
    under `cfg.cache_dir` (default the stage folder), one folder per process, named by what it holds."""
    if cfg.cache_storage == "memory":
        return MemoryStore(len(rows), activation_bytes(ctx, cfg, rows, layers) // len(rows), cfg.cache_max_gb)
    key = {"stage_dir": str(Path(stage_dir).resolve()), "target": cfg.target, "layers": layers,
           "teacher_checksum": float(ctx.teacher.lm_head.weight.detach().double().sum()),
           "rows": hashlib.sha256(np.asarray(rows.with_format("numpy")["input_ids"]).tobytes()).hexdigest()}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cfg.cache_dir or Path(stage_dir) / "activations").expanduser() / name
    return DiskStore(folder / f"rank{ctx.accelerator.process_index}", len(rows),
                     [(part, i) for part in captured_parts(cfg) for i in layers], len(rows[0]["input_ids"]),
                     ctx.teacher.config.hidden_size, key)


class LayerwiseObjective(torch.nn.Module):
    """Sum over the replaced layers of each layer's per-token alignment error (`cfg.objective`), each layer
    run on the teacher's hidden states or (`inputs: student`) on the student's own."""

    def __init__(self, student, layers: list[int], cfg):
        super().__init__()
        self.student, self.layers, self.cfg = student, layers, cfg

    def loss_tokens(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"].sum()

    def student_block_outputs(self, batch: dict) -> dict[int, torch.Tensor]:
        """Each Mamba block's output in one forward of the student's own stack, stopped after the deepest one.
        Each block's input is detached: its loss trains that block alone, on what the layers below it give."""
        outputs = {}

        def detach_input(module, args, kwargs):
            if args:
                return (args[0].detach(), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

        def record(index, args, kwargs, output):
            outputs[index] = output

        blocks = {i: self.student.model.layers[i] for i in self.layers}
        forward_to_deepest(lambda: self.student.model(**model_inputs(batch)), blocks, record,
                           before=detach_input)
        return outputs

    def forward(self, batch: dict, teacher_out: dict) -> dict:
        mask, position_ids = batch["attention_mask"], batch["position_ids"]
        if self.cfg.inputs == "student":
            outputs = self.student_block_outputs(batch)
            return self.summed({i: alignment_loss(outputs[i], teacher_out["outputs"][i], mask,
                                                   objective=self.cfg.objective, reduction="sum")
                                for i in self.layers})
        losses = {}
        for i in self.layers:
            layer, x = self.student.model.layers[i], teacher_out["inputs"][i]
            if self.cfg.target == "mixer_output":
                out = layer.mamba(x, attention_mask=None, position_ids=position_ids)
            else:
                out = layer(x, attention_mask=None, position_ids=position_ids)
            losses[i] = alignment_loss(out, teacher_out["outputs"][i], mask, objective=self.cfg.objective,
                                       reduction="sum")
        return self.summed(losses)

    @staticmethod
    def summed(losses: dict[int, torch.Tensor]) -> dict:
        return {"loss": sum(losses.values()), **{f"layer{i}": loss for i, loss in losses.items()}}


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
    capture = capture_teacher(ctx.accelerator, ctx.teacher, layers, cfg.target, captured_parts(cfg))
    train_ctx, teacher_step = ctx, capture
    store = None
    if cfg.activations == "cached":
        rows = cached_rows(ctx.train, cfg, seed)
        store = activation_store(ctx, cfg, rows, layers, stage_dir)
        teacher_step, train_ctx = ActivationCache(capture, store), dataclasses.replace(ctx, train=rows)
        logger.info("%s: teacher activations of %d rows cached (%s, %.2f GiB), %d epochs over them", label,
                    len(rows), cfg.cache_storage, activation_bytes(ctx, cfg, rows, layers) / 2**30,
                    cfg.cache_epochs)

    def held_out():
        if not cfg.held_out_rows:
            return None
        return held_out_losses(ctx.accelerator, objective, capture, ctx.held_out, cfg, cfg.held_out_rows)

    before = held_out()
    summary = train(train_ctx, stage_dir, cfg, objective, teacher_step=teacher_step)
    summary.update(held_out_before=before, held_out_after=held_out(), layers=layers)
    if isinstance(store, DiskStore):  # trained: the file (often many GB) has served its purpose
        shutil.rmtree(store.folder.parent, ignore_errors=True)
    student.requires_grad_(False)
    return summary
