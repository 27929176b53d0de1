"""The shared training loop: exact gradient accumulation, token budgets, kill-and-resume, 2 processes, NaN stop.

This file is also a script (`python tests/test_trainer.py SPEC_JSON`) so the kill and multi-process tests can
run the very same training in subprocesses and under `accelerate launch`.
"""

import copy
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reordering_bound, tiny_llama_config  # tests/ is on sys.path under pytest and as a script
from tolerances import adam_error, summed, within

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # tiny matmuls: more threads only contend on the shared 2-core box


def random_rows(n: int, length: int = 32, vocab: int = 128, seed: int = 0):
    """Rows in the batch format: 1-3 packed documents, a prompt without labels in each, right padding."""
    from datasets import Dataset

    g = random.Random(seed)
    columns = {"input_ids": [], "attention_mask": [], "position_ids": [], "labels": []}
    for _ in range(n):
        used = g.randint(length // 2, length)
        cuts = sorted(g.sample(range(2, used - 1), g.randint(0, 2)))
        input_ids = [g.randrange(vocab) for _ in range(length)]
        position_ids, labels = [], []
        for start, end in zip([0, *cuts], [*cuts, used]):
            prompt = g.randint(0, (end - start) // 2)
            position_ids += list(range(end - start))
            labels += [-100 if i == 0 or i < prompt else input_ids[start + i] for i in range(end - start)]
        pad = length - used
        columns["input_ids"].append(input_ids[:used] + [0] * pad)
        columns["attention_mask"].append([1] * used + [0] * pad)
        columns["position_ids"].append(position_ids + list(range(pad)))
        columns["labels"].append(labels + [-100] * pad)
    return Dataset.from_dict(columns)


def make_recipe(out, stage: dict, precision="fp32", **extra):
    from distill.recipe import recipe_from_dict

    return recipe_from_dict({"output_dir": str(out), "precision": precision, "stages": [stage], **extra})


def make_context(recipe, teacher, n_train=24, n_held_out=8):
    from distill.stages import StageContext
    from distill.trainer import make_accelerator

    return StageContext(
        recipe=recipe, accelerator=make_accelerator(recipe), teacher=teacher, tokenizer=None,
        train=random_rows(n_train, seed=1), held_out=random_rows(n_held_out, seed=2),
        output_dir=Path(recipe.output_dir),
    )


def tiny_pair():
    """A tiny Llama teacher and a perturbed copy as the student (all its parameters train in these tests)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def e2e_stage(**overrides):
    stage = {"name": "end_to_end", "max_tokens": 1200, "batch_size": 8, "grad_accum": 1, "lr": 3e-3,
             "trainable": "all", "held_out_rows": 0, "warmup_ratio": 0.2}
    stage.update(overrides)
    return stage


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(next((out / "stage0-end_to_end" / "final").glob("*.safetensors")))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator (possibly with another precision)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def run_e2e(out, precision="fp32", **overrides):
    from distill.stages import run_stage

    teacher, student = tiny_pair()
    recipe = make_recipe(out, e2e_stage(**overrides), precision=precision)
    ctx = make_context(recipe, teacher)
    student = run_stage(ctx, 0, recipe.stages[0], student)
    summary = json.loads((Path(out) / "stage0-end_to_end" / "summary.json").read_text())
    return student, summary


# ----------------------------------------------------------------------------- in-process tests


@pytest.mark.slow
def test_grad_accumulation_1x8_equals_8x1(tmp_path):
    """Rows carry different numbers of loss tokens, so only per-token normalisation over the whole step
    (not a mean per micro-batch) makes 1 micro-batch of 8 and 8 micro-batches of 1 the same update."""
    _, one = run_e2e(tmp_path / "a", batch_size=8, grad_accum=1)
    _, eight = run_e2e(tmp_path / "b", batch_size=1, grad_accum=8)
    assert one["steps"] == eight["steps"] == 7
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    # the same per-token gradients summed in another order: each within reordering_bound (at scale 1: relative)
    # of the other's, carried through 7 AdamW steps by tolerances.adam_error
    stage = make_recipe(tmp_path, e2e_stage()).stages[0]
    grad_error = reordering_bound(tiny_llama_config(), torch.float32, 1.0)
    for name in a:
        bound = adam_error(b[name], steps=7, lr=stage.lr, betas=stage.betas, grad_error=grad_error)
        within(((a[name] - b[name]).abs() / bound).max().item(), 1.0, name)
    before = tiny_pair()[1].state_dict()
    assert any(not torch.equal(before[n], a[n]) for n in a)  # it trained at all


def test_budget_counts_real_tokens_and_fixes_the_step_count(tmp_path):
    from distill.trainer import DataPlan

    rows = random_rows(24, seed=1)
    plan = DataPlan(rows, global_batch=8, seed=0, max_tokens=1200)
    real = sum(sum(mask) for mask in rows["attention_mask"])
    assert sum(plan.step_tokens) >= 1200 > sum(plan.step_tokens[:-1])
    assert sum(plan.step_tokens[:3]) == real  # the first three steps are exactly one epoch
    assert sorted(plan.rows(0).tolist() + plan.rows(1).tolist() + plan.rows(2).tolist()) == list(range(24))
    assert plan.rows(3).tolist() != plan.rows(0).tolist()  # the next epoch is reshuffled
    again = DataPlan(rows, global_batch=8, seed=0, max_tokens=1200)
    assert [again.rows(s).tolist() for s in range(5)] == [plan.rows(s).tolist() for s in range(5)]

    _, summary = run_e2e(tmp_path, max_tokens=1200)
    assert summary["tokens"] == sum(plan.step_tokens) and summary["steps"] == len(plan.step_tokens)
    log = [json.loads(line) for line in (tmp_path / "stage0-end_to_end" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, summary["steps"] + 1))
    # each row logs the rate of the next step: warmup to lr, then cosine down to lr * min_lr_ratio, computed in
    # float64 by a few operations on each side
    stage = make_recipe(tmp_path, e2e_stage()).stages[0]
    warmup = round(stage.warmup_ratio * summary["steps"])
    for row in log:
        progress = max(0.0, (row["step"] - warmup) / (summary["steps"] - warmup))
        factor = row["step"] / warmup if row["step"] < warmup else (
            stage.min_lr_ratio + (1 - stage.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2)
        within(abs(row["lr"] - stage.lr * factor), summed(8, torch.float64) * stage.lr, f"step {row['step']}")
    assert (tmp_path / "stage0-end_to_end" / "metrics.csv").read_text().startswith("step,tokens,lr,loss")


def test_loss_goes_down_and_rerun_skips_the_finished_stage(tmp_path):
    student, summary = run_e2e(tmp_path, max_tokens=3000, held_out_rows=8)
    assert summary["finished"] and summary["name"] == "end_to_end"
    assert summary["held_out_after"]["loss"] < 0.7 * summary["held_out_before"]["loss"]
    again, _ = run_e2e(tmp_path, max_tokens=3000, held_out_rows=8)  # finds summary.json and loads final/
    for (name, a), b in zip(student.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name  # reloaded from final/: the saved bits
    assert not (tmp_path / "stage0-end_to_end" / "checkpoints").exists()


def test_bf16_autocast_trains_on_cpu(tmp_path):
    _, summary = run_e2e(tmp_path, precision="bf16", max_tokens=2000, held_out_rows=8)
    assert summary["held_out_after"]["loss"] < summary["held_out_before"]["loss"]


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    plain, _ = run_e2e(tmp_path / "a")
    checkpointed, _ = run_e2e(tmp_path / "b", gradient_checkpointing=True)
    # recomputing the forward in backward runs the same ops on the same inputs in the same order, and each
    # parameter's gradient gathers at most two terms (the tied embedding: a + b == b + a): the same bits
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.equal(a, b), name


def test_no_weight_decay_on_ssm_dynamics_norms_and_biases():
    from distill.trainer import param_groups

    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_proj = torch.nn.Linear(4, 8)
            self.A_log = torch.nn.Parameter(torch.zeros(4, 2))  # Mamba-1's is 2-D: excluded by name
            self.dt_bias, self.D = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
            self.norm = torch.nn.LayerNorm(4)

    mixer = Mixer()
    names = {id(p): n for n, p in mixer.named_parameters()}
    decay, no_decay = param_groups(mixer, 0.1, lr=1e-3)
    assert [names[id(p)] for p in decay["params"]] == ["in_proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["in_proj.bias", "A_log", "dt_bias", "D", "norm.weight", "norm.bias"]
    )
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_mixer_lr_gives_the_mamba_mixers_their_own_learning_rate(tmp_path):
    from distill.trainer import param_groups

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mamba = torch.nn.Linear(4, 4)
            self.mlp = torch.nn.Linear(4, 4)

    block = Block()
    names = {id(p): n for n, p in block.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in param_groups(block, 0.0, 1e-4, mixer_lr=1e-3) for p in group["params"]}
    assert lr_of == {"mamba.weight": 1e-3, "mamba.bias": 1e-3, "mlp.weight": 1e-4, "mlp.bias": 1e-4}
    assert {g["lr"] for g in param_groups(block, 0.0, 1e-4)} == {1e-4}


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    from distill.errors import TrainingError
    from distill.trainer import train

    teacher, student = tiny_pair()
    recipe = make_recipe(tmp_path, e2e_stage(max_tokens=2000, checkpoint_every_tokens=300))
    ctx = make_context(recipe, teacher)
    from distill.kl import KLObjective, online_teacher

    calls = {"n": 0}
    step = online_teacher(ctx.accelerator, teacher)

    def poisoned(batch):
        calls["n"] += 1
        out = step(batch)
        return {**out, "hidden": out["hidden"] * float("nan")} if calls["n"] >= 5 else out

    with pytest.raises(TrainingError) as err:
        train(dataclasses.replace(ctx, label="stage 0"), tmp_path / "stage", recipe.stages[0],
              KLObjective(student, recipe.stages[0]), teacher_step=poisoned)
    message = str(err.value)
    assert "\n" not in message and "nan" in message and "at step 5/" in message and "lower the stage's lr" in message
    kept = sorted((tmp_path / "stage" / "checkpoints").glob("step-*"))
    assert kept and str(kept[-1]) in message
    assert not (tmp_path / "stage" / "summary.json").exists()


def test_incomplete_checkpoints_are_ignored(tmp_path):
    from distill.trainer import _checkpoints

    (tmp_path / "step-00000003").mkdir()  # killed before trainer_state.json was written (cannot happen
    (tmp_path / ".tmp-step-00000004").mkdir()  # with the rename, but a half-copied folder must not load)
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / "trainer_state.json").write_text("{}")
    assert _checkpoints(tmp_path) == [tmp_path / "step-00000002"]


@pytest.mark.slow
def test_wandb_offline_tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from distill.stages import run_stage

    teacher, student = tiny_pair()
    recipe = make_recipe(tmp_path, e2e_stage(max_tokens=500), logging={"wandb": True})
    ctx = make_context(recipe, teacher)
    run_stage(ctx, 0, recipe.stages[0], student)
    ctx.accelerator.end_training()
    runs = list((tmp_path / "wandb-root").rglob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


# ----------------------------------------------------------------------------- subprocess tests


def launch(spec: dict, *, processes: int = 1, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    if processes == 1:
        cmd = [sys.executable, __file__, json.dumps(spec)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + random.randrange(1000)), __file__, json.dumps(spec)]
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tmp_path):
    stage = e2e_stage(max_tokens=2400, checkpoint_every_tokens=250, keep_checkpoints=2)
    launch({"out": str(tmp_path / "straight"), "stage": stage})
    straight = [json.loads(line) for line in
                (tmp_path / "straight" / "stage0-end_to_end" / "metrics.jsonl").read_text().splitlines()]
    steps = len(straight)
    # the first checkpoint is written after the first step that crosses checkpoint_every_tokens
    first_checkpoint = next(row["step"] for row in straight if row["tokens"] >= stage["checkpoint_every_tokens"])
    assert steps >= first_checkpoint + 2, f"the budget gives only {steps} steps; raise max_tokens"
    # a forward pass (one micro-batch per step) after the first checkpoint and before the last step
    kill_at = random.Random().randint(first_checkpoint + 1, steps - 1)
    killed = launch({"out": str(tmp_path / "killed"), "stage": stage, "kill_at_forward": kill_at}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stage_dir = tmp_path / "killed" / "stage0-end_to_end"
    assert not (stage_dir / "summary.json").exists()
    assert list((stage_dir / "checkpoints").glob("step-*")), f"no checkpoint before forward {kill_at}"
    resumed = launch({"out": str(tmp_path / "killed"), "stage": stage})
    assert "resuming from" in resumed.stdout + resumed.stderr
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    # bit-equal by construction: both runs are processes on this machine with OMP_NUM_THREADS=1 (single-threaded CPU
    # kernels sum in a fixed order), and resuming restores weights, optimizer, scheduler, RNG and data position
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    log = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, len(log) + 1))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    launch({"out": str(tmp_path / "one"), "stage": e2e_stage(batch_size=4, grad_accum=2)})
    launch({"out": str(tmp_path / "two"), "stage": e2e_stage(batch_size=4, grad_accum=1)}, processes=2)
    assert json.loads((tmp_path / "two" / "processes.json").read_text()) == {"num_processes": 2, "type": "MULTI_CPU"}
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    # the same micro-batches of 4 rows in both (the same kernels, one thread each), and each gradient and loss sum
    # has two terms, one per micro-batch: accumulated in one process or all-reduced across two, a + b == b + a,
    # and the loss's factor 2 and DDP's mean over 2 processes are exact: the same bits
    for name in a:
        assert torch.equal(a[name], b[name]), name
    curves = [[json.loads(line)["loss"] for line in (tmp_path / run / "stage0-end_to_end" / "metrics.jsonl")
               .read_text().splitlines()] for run in ("one", "two")]
    assert curves[0] == curves[1]


def main(spec: dict) -> None:
    """Train the tiny student as `spec` says; `kill_at_forward` SIGKILLs this process in that forward pass."""
    from distill import kl
    from distill.stages import run_stage

    teacher, student = tiny_pair()
    recipe = make_recipe(spec["out"], spec["stage"])
    ctx = make_context(recipe, teacher)
    if ctx.accelerator.is_main_process:
        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        info = {"num_processes": ctx.accelerator.num_processes, "type": ctx.accelerator.distributed_type.value}
        (Path(spec["out"]) / "processes.json").write_text(json.dumps(info))
    if "kill_at_forward" in spec:
        forward, calls = kl.KLObjective.forward, {"n": 0}

        def dying_forward(self, batch, teacher_out):
            calls["n"] += 1
            if calls["n"] == spec["kill_at_forward"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(self, batch, teacher_out)

        kl.KLObjective.forward = dying_forward
    run_stage(ctx, 0, recipe.stages[0], student)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_bf16_products_are_native(monkeypatch, tmp_path, native):
    """`precision: auto` (the demo's) resolves once, before anything reads it: bf16 autocast where the hardware
    multiplies bf16 natively, fp32 where torch would emulate it; the other values pass through."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    from distill.trainer import resolve_precision

    auto = make_recipe(tmp_path, e2e_stage(), precision="auto")
    assert resolve_precision(auto).precision == ("bf16" if native else "fp32")
    for fixed in ("fp32", "bf16"):
        assert resolve_precision(make_recipe(tmp_path, e2e_stage(), precision=fixed)).precision == fixed
