"""Stock transformers vs stock transformers + our CPU kernels, side by side in one run, on our Bamba export.

    python scripts/bench_transformers.py --threads 1                    # prefill 2k and 8k, a training step, decode
    python scripts/bench_transformers.py --threads 1 --contexts 2048 --no-train   # fewer rows

The model is the Bamba export (`distill export --format bamba`, a stock `BambaForCausalLM`) of a 50%-attention
Mamba-2 student of SmolLM2-135M-Instruct: `--checkpoint DIR` (a run's final/ folder) or, by default, one built
from the teacher with the demo recipe's student settings (speed does not depend on trained weights). The same
export is loaded twice: once as transformers runs it on CPU (its pure-torch fallbacks), once with
`distill.kernels.transformers_hook.use_in_transformers` (our scan, decode step and conv through transformers'
kernel hook). Each measurement runs both back to back and prints the ratio:

- prefill tokens/s: one no-grad forward over batch x context random tokens (eval/speed.py's measure_prefill);
- training step tokens/s: forward with labels + backward, in train mode, on batch x --train-length tokens;
- decode tokens/s: greedy one-token steps on a cache holding --decode-context tokens (eval/speed.py's
  measure_decode, median step);
- the scan alone: the export's Mamba-2 scan at its own shapes (one layer, no grad, random inputs, the first
  prefill length), transformers' torch fallback vs ours, each called with the export's chunk_size. Its ratio
  against the prefill's shows how much of the model's time the scan is (the rest: projections, MLPs, attention
  and the LM head, the same code in both).

With --threads 1 every time is this thread's CPU time (eval/speed.py's clock), so other processes on a shared
machine do not count; otherwise wall time.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from distill.eval.speed import clock, measure_decode, measure_prefill
from distill.kernels.transformers_hook import ops_in_use, use_in_transformers

STUDENT = {"mixer": "mamba2", "attention_layers": "uniform", "attention_fraction": 0.5, "norm_init": "ones",
           "chunk_size": 64}  # timing only: the init does not matter


def bamba_export(checkpoint, folder):
    """Write the Bamba export of `checkpoint` (or of a fresh demo-recipe student of SmolLM2) into `folder`."""
    from distill.checkpoints import load_hybrid
    from distill.export import write_bamba

    if checkpoint is not None:
        model = load_hybrid(checkpoint)
    else:
        from distill.init import hybrid_from_teacher
        from distill.recipe import StudentConfig, TeacherConfig
        from distill.teacher import load_teacher

        teacher, _ = load_teacher(TeacherConfig(source="smollm2-135m-instruct"), dtype=torch.float32)
        model = hybrid_from_teacher(teacher, StudentConfig(**STUDENT))
    write_bamba(model.float().eval(), folder, "10GB")


def training_step_tok_s(model, batch, length, reps):
    """Tokens per second of forward (with labels) + backward, the best of `reps` steps after one warm-up."""
    model.train()
    now, times = clock(torch.device("cpu")), []
    ids = torch.randint(model.config.vocab_size, (batch, length))
    for _ in range(reps + 1):
        model.zero_grad(set_to_none=True)
        start = now()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(now() - start)
    model.eval()
    model.zero_grad(set_to_none=True)
    return batch * length / min(times[1:])


def scan_tok_s(scan, config, batch, length, reps=3):
    """Tokens per second of one Mamba layer's scan at the export's shapes (no grad, best of `reps`)."""
    gen = torch.Generator().manual_seed(0)
    h, p, g, n = config.mamba_n_heads, config.mamba_d_head, config.mamba_n_groups, config.mamba_d_state
    x = torch.randn(batch, length, h, p, generator=gen)
    dt = torch.rand(batch, length, h, generator=gen) * 4 - 6  # softplus -> dt in ~[2e-3, 0.12]
    B, C = (torch.randn(batch, length, g, n, generator=gen) for _ in range(2))
    A, D, dt_bias = -torch.linspace(1, h, h), torch.randn(h), torch.randn(h, generator=gen) * 0.1
    now, times = clock(torch.device("cpu")), []
    with torch.no_grad():
        for _ in range(reps + 1):
            start = now()
            scan(x, dt, A, B, C, config.mamba_chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)
            times.append(now() - start)
    return batch * length / min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a native checkpoint (e.g. a run's final/)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192], help="prefill lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prefill-reps", type=int, default=1, help="prefill calls per model (best counts)")
    parser.add_argument("--train-length", type=int, default=2048)
    parser.add_argument("--train-reps", type=int, default=2)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--decode-context", type=int, default=2048)
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps (median)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import BambaForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        bamba_export(args.checkpoint, folder)
        stock = BambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ours = use_in_transformers(BambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    assert not ops_in_use(stock) and ops_in_use(ours), "the hook did not take"
    config = stock.config
    timer = "thread CPU time" if clock(torch.device("cpu")) is time.thread_time else "wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), timed by {timer}; Bamba export: "
          f"{config.num_hidden_layers} layers ({len(config.attn_layer_indices)} attention), mamba heads "
          f"{config.mamba_n_heads} x {config.mamba_d_head}, d_state {config.mamba_d_state}, "
          f"chunk_size {config.mamba_chunk_size}; our kernels: {', '.join(sorted(ops_in_use(ours)))}")
    print("| measurement | stock transformers | stock + ours | ours / stock |")
    print("|---|---:|---:|---:|")

    def row(label, measure):
        values = {name: measure(model) for name, model in (("stock", stock), ("ours", ours))}
        print(f"| {label} | {values['stock']:.1f} | {values['ours']:.1f} | {values['ours'] / values['stock']:.2f}x |",
              flush=True)

    from transformers.models.bamba.modeling_bamba import mamba2_chunk_scan

    from distill.kernels.dispatch import mamba_chunk_scan_combined

    values = {"stock": scan_tok_s(mamba2_chunk_scan, config,
                                  args.batch, args.contexts[0]),
              "ours": scan_tok_s(mamba_chunk_scan_combined, config, args.batch, args.contexts[0])}
    print(f"| one layer's scan alone tok/s, b={args.batch}, {args.contexts[0]} tokens | {values['stock']:.0f} | "
          f"{values['ours']:.0f} | {values['ours'] / values['stock']:.2f}x |", flush=True)
    for context in args.contexts:
        row(f"prefill tok/s, b={args.batch}, {context} tokens",
            lambda m, c=context: max(measure_prefill(m, args.batch, c) for _ in range(args.prefill_reps)))
    if not args.no_train:
        row(f"training step tok/s, b={args.batch}, {args.train_length} tokens",
            lambda m: training_step_tok_s(m, args.batch, args.train_length, args.train_reps))
    row(f"decode tok/s, b={args.decode_batch}, {args.decode_context} cached tokens",
        lambda m: measure_decode(m, args.decode_batch, args.decode_context, args.steps)["decode_tok_s"])


if __name__ == "__main__":
    main()
