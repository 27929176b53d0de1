"""The one training loop every stage runs on.

A stage hands `train` an objective: an `nn.Module` whose `forward(batch, teacher_out)` returns a dict of
*summed* per-token losses (key "loss" is optimised, the others are logged), and a `teacher_step(batch)`
that computes the frozen teacher's part outside the trained module. The loop owns everything else:

- Data order. Rows are visited in a seeded permutation per epoch; global step s consumes rows
  [s * G, (s + 1) * G) of that stream, G = batch_size * grad_accum * num_processes, and each process takes
  its own micro-batches from them. So 1 process x 8 micro-batches, 8 processes x 1 and any resumed run see
  the same rows in the same optimizer steps, and the data position is just the step number.
- Normalisation. The loss of an optimizer step is the sum over every loss token of every micro-batch on
  every process divided by the global number of loss tokens (counted before the forward passes), so
  gradient accumulation and data parallelism give exactly the per-token mean of one big batch.
- Budgets. `max_tokens` counts real input tokens (attention_mask == 1, padding excluded) consumed by the
  student over all processes. The number of optimizer steps is fixed up front: the fewest global steps whose
  rows reach the budget, so the LR schedule (linear warmup, cosine to min_lr_ratio) is known in advance.
- Checkpoints every `checkpoint_every_tokens`: `accelerator.save_state` into a temp dir, renamed when
  complete, last K kept. `resume: auto` reloads the newest one (model, optimizer, scheduler, RNG, step).
- A non-finite loss or gradient norm stops the stage with a one-line `TrainingError`; checkpoints already
  written are kept, so fixing the recipe and rerunning continues from the last good one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from distill.data import COLUMNS
from distill.errors import TrainingError
from distill.files import move_into_place, write_text
from distill.layout import checkpoints_dir
from distill.modeling_hybrid import is_mixer_param
from distill.recipe import RecipeError

NO_DECAY_NAMES = ("A_log", "dt_bias", "D")


def fast_bf16() -> bool:
    """Whether this machine multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or
    AMX. Elsewhere (AVX2-only CPUs) torch emulates bf16 products, several times slower than fp32's."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # torch exposes the CPU's bf16 features only through these underscored checks; a torch without them gets fp32.
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


def resolve_precision(recipe):
    """`recipe` with `precision: auto` replaced by what runs here (bf16 if `fast_bf16()`, else fp32)."""
    if recipe.precision != "auto":
        return recipe
    return recipe.model_copy(update={"precision": "bf16" if fast_bf16() else "fp32"})


def make_accelerator(recipe) -> Accelerator:
    """The run's Accelerator: CPU (gloo when launched multi-process) without CUDA, precision and trackers."""
    cuda = torch.cuda.is_available()
    recipe = resolve_precision(recipe)
    if recipe.precision == "fp16" and not cuda:
        raise RecipeError("precision = 'fp16' needs a CUDA GPU; use precision: bf16 (or fp32) on CPU")
    log_with = None
    if recipe.logging.wandb:
        os.environ["WANDB_MODE"] = recipe.logging.wandb_mode
        os.environ.setdefault("WANDB_DIR", str(Path(recipe.output_dir).resolve()))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
        log_with = "wandb"
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.precision],
        log_with=log_with,
        project_dir=recipe.output_dir,
    )
    if log_with:
        accelerator.init_trackers(recipe.logging.wandb_project, config=recipe.model_dump(mode="json"))
    set_seed(recipe.seed)
    return accelerator


# ----------------------------------------------------------------------------- data order


class DataPlan:
    """Which dataset rows each global step consumes: a seeded permutation per epoch, cycled as needed."""

    def __init__(self, dataset, global_batch: int, seed: int, max_tokens: int, row_tokens=None):
        self.dataset = dataset.with_format("torch", columns=list(COLUMNS))
        self.global_batch, self.seed = global_batch, seed
        if row_tokens is None:  # what the budget counts per row: its real tokens unless the stage says otherwise
            row_tokens = np.asarray(dataset.with_format("numpy")["attention_mask"]).sum(axis=1)
        self.row_tokens = np.asarray(row_tokens)
        self._epochs: dict[int, np.ndarray] = {}
        self.step_tokens: list[int] = []
        while sum(self.step_tokens) < max_tokens:
            self.step_tokens.append(int(self.row_tokens[self.rows(len(self.step_tokens))].sum()))

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epochs[epoch] = torch.randperm(len(self.row_tokens), generator=gen).numpy()
        return self._epochs[epoch]

    def rows(self, step: int) -> np.ndarray:
        n = len(self.row_tokens)
        positions = range(step * self.global_batch, (step + 1) * self.global_batch)
        return np.array([self._perm(p // n)[p % n] for p in positions])

    def batch(self, rows, device, step: int) -> dict:
        """The rows as tensors, plus each one's row index and the global step (per row, so batches slice)."""
        batch = {k: v.to(device) for k, v in self.dataset[[int(r) for r in rows]].items()}
        batch["row"] = torch.as_tensor(rows, device=device)
        batch["step"] = torch.full_like(batch["row"], step)
        return batch


def batches(dataset, batch_size: int, device, limit: int | None = None):
    """Held-out rows in order, as batches (every process evaluates all of them; the set is small)."""
    rows = np.arange(len(dataset) if limit is None else min(limit, len(dataset)))
    plan_ds = dataset.with_format("torch", columns=list(COLUMNS))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in plan_ds[[int(r) for r in chunk]].items()}
        batch["row"] = torch.as_tensor(chunk, device=device)
        yield batch


# ----------------------------------------------------------------------------- what trains


def set_trainable(student, trainable: str) -> None:
    """`mixers`: only the Mamba mixers; `all`: every parameter. (LoRA is layered on top by `distill.kl.with_lora`.)"""
    for name, param in student.named_parameters():
        param.requires_grad_(trainable == "all" or is_mixer_param(name))
    if not any(p.requires_grad for p in student.parameters()):
        raise TrainingError("trainable = 'mixers' but the student has no Mamba layers; use trainable: all")


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, mixer_lr: float | None = None) -> list[dict]:
    """Trainable parameters, with no weight decay on SSM dynamics (A_log, dt_bias, D), norms and biases, and
    with `mixer_lr` (when set) for the Mamba mixers' parameters and `lr` for every other one."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES or "norm" in name
        groups.setdefault((mixer_lr is not None and is_mixer_param(name), no_decay), []).append(param)
    if not groups:
        raise TrainingError("no trainable parameters: the stage froze everything; check its `trainable` setting")
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr": mixer_lr if mixer else lr}
            for (mixer, no_decay), params in sorted(groups.items())]


# ----------------------------------------------------------------------------- checkpoints


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temp dir is only renamed to step-* once fully written)."""
    return sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file())


def save_checkpoint(accelerator, root: Path, state: dict, scheduler, keep: int) -> None:
    tmp, final = root / f".tmp-step-{state['step']:08d}", root / f"step-{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        move_into_place(tmp, final)
        for old in _checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_training_state(accelerator, path: Path, scheduler) -> dict:
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


# ----------------------------------------------------------------------------- metrics log


class MetricsLog:
    """metrics.jsonl and metrics.csv in the stage dir, plus the accelerate trackers (wandb) when enabled."""

    def __init__(self, accelerator, stage_dir: Path, prefix: str, resume_step: int):
        self.accelerator, self.prefix = accelerator, prefix
        self.jsonl, self.csv = stage_dir / "metrics.jsonl", stage_dir / "metrics.csv"
        self.rows: list[dict] = []
        if accelerator.is_main_process and self.jsonl.exists():
            # after a resume, drop what was logged past the checkpoint so each step appears once
            old = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
            self.rows = [row for row in old if row["step"] <= resume_step]
            write_text(self.jsonl, "".join(json.dumps(row) + "\n" for row in self.rows))

    def log(self, row: dict) -> None:
        if self.accelerator.is_main_process:
            self.rows.append(row)
            with self.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            keys = list(dict.fromkeys(k for r in self.rows for k in r))
            with self.csv.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.rows)
        self.accelerator.log({f"{self.prefix}/{k}": v for k, v in row.items()}, step=None)


# ----------------------------------------------------------------------------- the loop


def _to_float(value) -> float:
    return float(value.detach().float()) if torch.is_tensor(value) else float(value)


@torch.no_grad()
def held_out_losses(accelerator, objective, teacher_step, dataset, cfg, limit: int) -> dict:
    """Per-token held-out losses of the objective (every key it returns), on the first `limit` rows."""
    model = accelerator.unwrap_model(objective)
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for batch in batches(dataset, cfg.batch_size, accelerator.device, limit):
        teacher_out = teacher_step(batch) if teacher_step else {}
        with accelerator.autocast():
            out = model(batch, teacher_out)
        count += int(model.loss_tokens(batch))
        for key, value in out.items():
            totals[key] = totals.get(key, 0.0) + _to_float(value)
    model.train(was_training)
    return {key: value / max(count, 1) for key, value in totals.items()}


@dataclass
class Loop:
    """What `setup` builds for one training run of a stage."""

    accelerator: Any
    cfg: Any
    model: Any  # the objective, prepared by accelerate
    optimizer: Any
    scheduler: Any
    plan: DataPlan
    checkpoints: Path
    params: list  # the trainable parameters (for clipping)
    loss_scale: int  # DeepSpeed divides by grad_accum itself
    label: str

    @property
    def total_steps(self) -> int:
        return len(self.plan.step_tokens)


def setup(ctx, stage_dir: Path, cfg, objective, max_tokens: int, row_tokens=None) -> Loop:
    """The data plan, optimizer, LR schedule and accelerate wrapping for training `objective` on `ctx.train`."""
    accelerator = ctx.accelerator
    world = accelerator.num_processes
    plan = DataPlan(ctx.train, cfg.batch_size * cfg.grad_accum * world, ctx.seed, max_tokens, row_tokens)
    total_steps = len(plan.step_tokens)
    groups = param_groups(objective, cfg.weight_decay, cfg.lr, getattr(cfg, "mixer_lr", None))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    # Not passed through accelerator.prepare: its wrapper would step the schedule once per process.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, round(cfg.warmup_ratio * total_steps), total_steps, min_lr_rate=cfg.min_lr_ratio
    )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # DeepSpeed accumulates itself: it steps at every grad_accum-th backward, dividing by it
        accelerator.gradient_accumulation_steps = cfg.grad_accum
    model, optimizer = accelerator.prepare(objective, optimizer)
    return Loop(accelerator, cfg, model, optimizer, scheduler, plan, checkpoints_dir(stage_dir),
                [p for p in model.parameters() if p.requires_grad], cfg.grad_accum if deepspeed else 1, ctx.label)


def resume(loop: Loop) -> dict:
    """The training state to start from: the newest checkpoint's (`resume: auto`) or a fresh one."""
    accelerator, root = loop.accelerator, loop.checkpoints
    state = {"step": 0, "tokens": 0, "wall_time_s": 0.0, "losses": []}
    newest = _checkpoints(root)[-1:] if loop.cfg.resume == "auto" else []
    if newest:
        state = load_training_state(accelerator, newest[0], loop.scheduler)
        accelerator.print(f"{loop.label}: resuming from {newest[0]} (step {state['step']}/{loop.total_steps})")
    elif accelerator.is_main_process:
        shutil.rmtree(root, ignore_errors=True)
    if accelerator.is_main_process:  # checkpoints a kill interrupted while they were being written
        for partial in root.glob(".tmp-*"):
            shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    return state


def step(loop: Loop, step_index: int, teacher_step) -> tuple[dict, Any]:
    """One optimizer step: forward and backward over this process's micro-batches, normalised by the global
    number of loss tokens, then clip and step. Returns the step's per-token metrics and the gradient norm."""
    accelerator, cfg, model = loop.accelerator, loop.cfg, loop.model
    world, rank = accelerator.num_processes, accelerator.process_index
    unwrapped = accelerator.unwrap_model(model)
    rows = loop.plan.rows(step_index).reshape(cfg.grad_accum, world, cfg.batch_size)[:, rank]
    micro = [loop.plan.batch(r, accelerator.device, step_index) for r in rows]
    counts = torch.stack([unwrapped.loss_tokens(b) for b in micro]).sum().to(accelerator.device)
    n_global = accelerator.reduce(counts.float(), "sum").clamp(min=1)
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro):
        teacher_out = teacher_step(batch) if teacher_step else {}
        sync = i == len(micro) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = model(batch, teacher_out)
            accelerator.backward(out["loss"] * (world * loop.loss_scale) / n_global)
        for key, value in out.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
    metrics = {k: accelerator.reduce(v, "sum") / n_global for k, v in sums.items()}
    grad_norm = accelerator.clip_grad_norm_(loop.params, cfg.grad_clip or float("inf"))
    loss = float(metrics["loss"])
    if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
        kept = _checkpoints(loop.checkpoints)
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
        raise TrainingError(
            f"{loop.label}: the loss became {loss} (grad norm {float(grad_norm) if grad_norm is not None else 'n/a'})"
            f" at step {step_index + 1}/{loop.total_steps}; {where}; lower the stage's lr or set grad_clip, then rerun"
        )
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return metrics, grad_norm


def train(
    ctx,
    stage_dir: Path,
    cfg,
    objective: torch.nn.Module,
    *,
    teacher_step: Callable[[dict], dict] | None = None,
    max_tokens: int | None = None,
    row_tokens=None,
) -> dict:
    """Train `objective`'s trainable parameters on `ctx.train` for `cfg` and return a summary dict.

    The objective must define `loss_tokens(batch) -> int tensor` (how many tokens its summed loss covers)
    and `forward(batch, teacher_out) -> {"loss": summed loss, other summed metrics}`. `ctx.seed` orders the
    rows and `ctx.label` names the run in the progress bar. `row_tokens` (one number per row) is what the
    budget counts, by default each row's real tokens. Every micro-batch carries its global `step` (one per
    row), e.g. to seed what a stage samples.
    """
    accelerator = ctx.accelerator
    accelerator.free_memory()
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    loop = setup(ctx, stage_dir, cfg, objective, max_tokens or cfg.max_tokens, row_tokens)
    state = resume(loop)
    root = Path(ctx.output_dir)
    prefix = stage_dir.relative_to(root).as_posix() if stage_dir.is_relative_to(root) else stage_dir.name
    log = MetricsLog(accelerator, stage_dir, prefix, state["step"])
    step_tokens, every = loop.plan.step_tokens, cfg.checkpoint_every_tokens
    bar = tqdm(
        total=sum(step_tokens), initial=state["tokens"], unit="tok", unit_scale=True, desc=loop.label,
        disable=not accelerator.is_local_main_process, dynamic_ncols=True,
    )
    start_time, start_tokens = time.perf_counter(), state["tokens"]
    loop.model.train()
    for index in range(state["step"], loop.total_steps):
        try:
            metrics, grad_norm = step(loop, index, teacher_step)
        except TrainingError:
            bar.close()
            raise
        loss = float(metrics["loss"])
        state["step"], state["tokens"] = index + 1, state["tokens"] + step_tokens[index]
        state["losses"] = (state["losses"] + [loss])[-20:]
        speed = (state["tokens"] - start_tokens) / max(time.perf_counter() - start_time, 1e-9)
        bar.update(step_tokens[index])
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed:.0f}", refresh=False)
        if state["step"] % cfg.log_every_steps == 0 or state["step"] == loop.total_steps:
            row = {"step": state["step"], "tokens": state["tokens"], "lr": loop.scheduler.get_last_lr()[0]}
            row.update({k: float(v) for k, v in metrics.items()})
            row.update(grad_norm=float(grad_norm) if grad_norm is not None else None, tokens_per_s=speed)
            log.log(row)
        crossed = every and state["tokens"] // every > (state["tokens"] - step_tokens[index]) // every
        if crossed and state["step"] < loop.total_steps:
            state["wall_time_s"] += time.perf_counter() - start_time
            start_time, start_tokens = time.perf_counter(), state["tokens"]
            save_checkpoint(accelerator, loop.checkpoints, state, loop.scheduler, cfg.keep_checkpoints)
    bar.close()
    state["wall_time_s"] += time.perf_counter() - start_time
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return {
        "tokens": state["tokens"],
        "steps": state["step"],
        "wall_time_s": round(state["wall_time_s"], 2),
        "final_loss": float(np.mean(state["losses"][-max(1, min(5, len(state["losses"]))) :])),
        "last_step_loss": state["losses"][-1],
    }
