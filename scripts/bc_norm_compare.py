"""Qwen3's q/k norms in the Mamba mixer: a per-head RMSNorm on B and C (`bc_norm: true`) against dropping them.

    python scripts/bc_norm_compare.py [--teacher-steps 800] [--layerwise-tokens 1e5] [--seeds 0 1 2]
                                      [--conv-inits random identity]

No Qwen3 checkpoint is reachable here, so the teacher is a tiny Qwen3 (4 layers, hidden 128, 4 heads of 32 on
2 kv-heads, byte-level vocabulary) trained from scratch on ShareGPT bytes, so its q_norm/k_norm weights are
learned, not ones; it is trained once and kept under $MAMBA_DISTILL_CACHE/teachers. For each conv init, seed and
variant, the 50% Mamba-2 student is scored against the teacher at initialisation and after a layerwise stage
(the real one, `distill.stages`): held-out KL(teacher||student), top-1 agreement, and the summed per-layer
alignment MSE of the mixers. Same seed, same rows, same fresh parameters in both variants: only the norms differ.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill.assets import cache_root
from distill.data import build_datasets
from distill.eval.quality import compare_on_held_out
from distill.init import hybrid_from_teacher
from distill.layout import RunLayout, read_summary
from distill.recipe import DataConfig, StudentConfig, recipe_from_dict
from distill.stages import StageContext, run_stage
from distill.trainer import make_accelerator

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import make_tiny_tokenizer


def train_teacher(train, steps: int, batch_size: int = 8, lr: float = 3e-3):
    """A tiny Qwen3 trained from scratch with next-byte cross-entropy on the training rows."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=258, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=256, eos_token_id=257, pad_token_id=257, attn_implementation="sdpa",
    )
    model = Qwen3ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    rows = train.with_format("torch")
    for step in range(steps):
        index = torch.randint(len(rows), (batch_size,)).tolist()
        batch = rows[index]
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"teacher step {step:4d}  loss {loss.item():.3f} nats/byte", flush=True)
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--layerwise-tokens", type=float, default=1e5)
    parser.add_argument("--rows", type=int, default=32, help="held-out rows of 256 bytes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conv-inits", nargs="+", choices=["random", "identity"], default=["random", "identity"])
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = make_tiny_tokenizer()
    train, held_out = build_datasets(
        DataConfig(max_length=256, max_conversations=3000, held_out_size=args.rows, loss_on="all"), tokenizer, seed=0
    )
    started = time.perf_counter()
    saved = cache_root() / "teachers" / f"tiny-qwen3-bytes-{args.teacher_steps}"
    if (saved / "config.json").is_file():
        from transformers import Qwen3ForCausalLM

        teacher = Qwen3ForCausalLM.from_pretrained(saved).eval().requires_grad_(False)
    else:
        teacher = train_teacher(train, args.teacher_steps)
        teacher.save_pretrained(saved)
    norms = {kind: torch.stack([getattr(layer.self_attn, kind).weight for layer in teacher.model.layers])
             for kind in ("q_norm", "k_norm")}
    print(f"teacher ready in {time.perf_counter() - started:.0f} s ({saved}); learned norm weights: "
          + ", ".join(f"{k} mean {v.mean():.3f} std {v.std():.3f}" for k, v in norms.items()))

    results = {}
    for conv_init, seed, bc_norm in itertools.product(args.conv_inits, args.seeds, (True, False)):
        cfg = StudentConfig(attention_layers="uniform", attention_fraction=0.5, bc_norm=bc_norm, conv_init=conv_init,
                            norm_init="ones")
        student = hybrid_from_teacher(teacher, cfg, seed=seed)
        at_init = compare_on_held_out(student, teacher, held_out, max_sequences=args.rows)["student"]
        with tempfile.TemporaryDirectory() as out:
            recipe = recipe_from_dict({
                "output_dir": out, "precision": "fp32", "seed": seed,
                "stages": [{"name": "layerwise", "max_tokens": args.layerwise_tokens, "lr": 2e-3,
                            "batch_size": 8, "held_out_rows": args.rows}],
            })
            ctx = StageContext(recipe=recipe, accelerator=make_accelerator(recipe), teacher=teacher,
                               tokenizer=tokenizer, train=train, held_out=held_out, output_dir=Path(out))
            student = run_stage(ctx, 0, recipe.stages[0], student).eval()
            summary = read_summary(RunLayout(out).stage(0, "layerwise"))
        after = compare_on_held_out(student, teacher, held_out, max_sequences=args.rows)["student"]
        row = {
            "kl_init": at_init["kl_to_teacher"], "top1_init": at_init["top1_agreement"],
            "mse_init": summary["held_out_before"]["loss"], "mse_after": summary["held_out_after"]["loss"],
            "kl_after": after["kl_to_teacher"], "top1_after": after["top1_agreement"],
        }
        results.setdefault((conv_init, bc_norm), []).append(row)
        print(f"conv {conv_init} seed {seed} bc_norm={bc_norm!s:5s} "
              + " ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)

    for conv_init in args.conv_inits:
        print(f"\nconv_init {conv_init}, mean over seeds {args.seeds} (bc_norm true vs false; ratio = true / false)")
        print(f"{'metric':12s} {'true':>9s} {'false':>9s} {'ratio':>7s}")
        for key in results[conv_init, True][0]:
            with_norm = statistics.mean(r[key] for r in results[conv_init, True])
            without = statistics.mean(r[key] for r in results[conv_init, False])
            print(f"{key:12s} {with_norm:9.4f} {without:9.4f} {with_norm / without:7.3f}")


if __name__ == "__main__":
    main()
