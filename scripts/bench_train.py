"""Distillation step throughput on SmolLM2-135M at 50% Mamba-2, fp32 vs bf16, side by side.

    python scripts/bench_train.py [--batch-size 4 --seq-len 512 --steps 4 --trainable mixers]
    python scripts/bench_train.py --stage layerwise      # the layerwise alignment step instead
    python scripts/bench_train.py --stage layerwise --precisions bf16 --activations online cached

Each variant runs the training step the `end_to_end` stage runs (the same functions): the teacher forward
under inference_mode, the student forward to its final hidden states, the chunked KL (whose forward also
computes its gradient), the student backward and the AdamW step. `--stage layerwise` times that stage's
step instead: the teacher forward with the capture hooks (it stops after the deepest replaced layer), each
mixer's forward on its captured input and the MSE, the backward and the AdamW step; with `--activations
cached` the teacher forward is replaced by reading the captured activations from `ActivationCache` (what
`activations: cached` does after a row's first epoch). It prints tokens/s per variant, the share of the step
in each part, and the ratio of the last variant to the first. bf16 means what `precision: bf16` does:
the teacher's weights in bf16, the student's fp32 master weights under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


def now() -> float:
    """Thread CPU time with one torch thread (all the work runs on this thread, so other jobs on a shared
    machine do not inflate it), else wall time."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def timed(clock: dict, key: str):
    @contextlib.contextmanager
    def section():
        start = now()
        yield
        clock[key] = clock.get(key, 0.0) + now() - start

    return section()


class AutocastOnly:
    """What capture_teacher needs of an Accelerator: its autocast context."""

    def __init__(self, context):
        self.context = context

    def autocast(self):
        return self.context


def run_variant(precision: str, activations: str, teacher_fp32, student_cfg, batch: dict, args) -> dict:
    from distill.data import loss_positions, model_inputs
    from distill.init import hybrid_from_teacher
    from distill.losses import distill_kl
    from distill.trainer import param_groups, set_trainable

    bf16 = precision == "bf16"
    teacher = teacher_fp32.to(torch.bfloat16) if bf16 else teacher_fp32
    student = hybrid_from_teacher(teacher_fp32, student_cfg, seed=0).train()
    set_trainable(student, args.trainable)
    optimizer = torch.optim.AdamW(param_groups(student, 0.0, 1e-5), lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    mask = loss_positions(batch["labels"])
    if args.stage == "layerwise":
        from distill.alignment import LayerwiseObjective, capture_teacher, mamba_layers
        from distill.recipe import LayerwiseStage

        layers = mamba_layers(student)
        objective = LayerwiseObjective(student, layers, LayerwiseStage(name="layerwise", max_tokens=1))
        capture = capture_teacher(AutocastOnly(autocast), teacher, layers, "mixer_output")
        if activations == "cached":
            from distill.alignment import ActivationCache

            capture = ActivationCache(capture, num_rows=len(batch["row"]), row_bytes=0, max_gb=1)
            capture(batch)  # the first epoch's capture; the timed steps read the cache

    clock: dict[str, float] = {}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            clock.clear()
        if args.stage == "layerwise":
            with timed(clock, "teacher forward"):
                captured = capture(batch)
            with timed(clock, "mixers fwd + MSE"), autocast:
                loss = objective(batch, captured)["loss"]
        else:
            with timed(clock, "teacher forward"), torch.inference_mode(), autocast:
                teacher_hidden = teacher.model(**model_inputs(batch)).last_hidden_state
            with timed(clock, "student forward"), autocast:
                hidden = student.model(**model_inputs(batch)).last_hidden_state
            with timed(clock, "loss (fwd+grad)"), autocast:
                loss = distill_kl(hidden, teacher_hidden, mask, student_head=student.lm_head.weight,
                                  teacher_head=teacher.lm_head.weight, chunk=args.kl_chunk)
        with timed(clock, "student backward"):
            loss.backward()
        with timed(clock, "optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    total = sum(clock.values())
    tokens = int(batch["attention_mask"].sum()) * args.steps
    return {"variant": f"{precision}-{activations}" if args.stage == "layerwise" else precision, "tok_s": tokens / total, "step_s": total / args.steps, "parts": clock,
            "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--kl-chunk", type=int, default=1024)
    parser.add_argument("--trainable", choices=["mixers", "all"], default="mixers")
    parser.add_argument("--stage", choices=["end_to_end", "layerwise"], default="end_to_end")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--activations", nargs="+", choices=["online", "cached"], default=["online"],
                        help="layerwise only: teacher forward per step, or activations read from the cache")
    args = parser.parse_args()

    from distill.recipe import StudentConfig, TeacherConfig
    from distill.teacher import load_teacher

    teacher, _ = load_teacher(TeacherConfig(), dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len)
    ids = torch.randint(0, teacher.config.vocab_size, shape, generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(args.seq_len).expand(shape).contiguous(), "labels": ids.clone(),
             "row": torch.arange(args.batch_size)}
    student_cfg = StudentConfig(mixer="mamba2", attention_layers="uniform", attention_fraction=0.5, chunk_size=64,
                                norm_init="ones")  # timing only: the init does not matter

    print(f"SmolLM2-135M teacher -> 50% Mamba-2 student, {args.stage} step, trainable={args.trainable}, batch "
          f"{args.batch_size} x {args.seq_len}, {args.steps} timed steps after {args.warmup} warm-up, torch threads "
          f"{torch.get_num_threads()} (timed in {'thread CPU' if torch.get_num_threads() == 1 else 'wall'} time)")
    activations = args.activations if args.stage == "layerwise" else ["online"]
    results = [run_variant(p, a, teacher, student_cfg, batch, args) for p in args.precisions for a in activations]
    parts = list(results[0]["parts"])
    header = f"{'variant':12} {'tok/s':>8} {'s/step':>7}  " + "  ".join(f"{p:>17}" for p in parts)
    print(header)
    for r in results:
        shares = "  ".join(f"{100 * r['parts'][p] / sum(r['parts'].values()):16.1f}%" for p in parts)
        print(f"{r['variant']:12} {r['tok_s']:8.1f} {r['step_s']:7.2f}  {shares}")
    if len(results) >= 2:
        print(f"{results[-1]['variant']}/{results[0]['variant']} throughput ratio: "
              f"{results[-1]['tok_s'] / results[0]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
