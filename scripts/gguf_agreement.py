"""How closely llama.cpp follows our model per GGUF outtype: top-1 agreement at every held-out position.

    python scripts/gguf_agreement.py RUN_DIR [--rows 8] [--tokens 128] [--models teacher student]

RUN_DIR is a finished run (`RUN_DIR/final` and `RUN_DIR/recipe.yaml`). Its teacher (written by the same
exporter as an all-attention model) and its student are exported in f32, f16, q8_0 and q8_0 with some matrices
kept in f16, and each file runs teacher-forced in llama.cpp over the first `--rows` held-out rows of the
recipe's data (`--tokens` each; the system prompt they share is scored in the first row only). The reference
is our fp32 model in transformers; a position agrees when llama.cpp's top-1 token is ours (f32 files run with
an f32 attention cache, the others with llama.cpp's default f16). The f32 file also decodes greedily from
each row's first 48 tokens, compared with ours up to our first pick that wins by less than 1e-3. Also
counted: the positions where our top-1 wins by more than 0.1 nats (disagreeing there is not a near tie), and
the disagreements per bin of our top-1 margin. The q8_0 variants with some matrices in f16 show which
matrices' rounding costs agreement (llama.cpp's q8_0 products also round the activations to 8 bits).
Prints one line per (model, variant); writes `--out` as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch

from distill import llama_cpp
from distill.assets import asset_path
from distill.checkpoints import load_hybrid
from distill.data import build_datasets
from distill.export_gguf import tokenizer_from_gguf, write_gguf
from distill.init import hybrid_from_teacher
from distill.recipe import StudentConfig, load_recipe
from distill.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
CLEAR_NATS = 0.1  # a top-1 margin well above q8_0's logit noise on this model (~0.01-0.05 nats)
GREEDY_MARGIN = (
    1e-3  # f32 greedy picks are compared while they win by more than this (f32 logits differ ~1e-5)
)
GREEDY_PROMPT, GREEDY_STEPS = 48, 32  # f32 greedy: the first 48 tokens of each row, 32 tokens on

MIXERS = (
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ssm_in.weight",
    "ssm_out.weight",
)
MATRICES = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", *MIXERS)
EDGE_LAYERS = (0, 1, 2, 3, 26, 27, 28, 29)  # SmolLM2-135M's first and last 4 of 30 (llama.cpp's k-quants
# give their edge layers more bits)
MARGINS = (0.01, 0.1, 1.0)  # bin edges (nats) of our top-1 margin for counting where the disagreements lie
# (label, outtype, name suffixes kept f16 in a q8_0 file); "q8_0 weights in f32" rounds the matrices as q8_0
# does but stores and computes them in f32: what q8_0 costs without llama.cpp's 8-bit activations
VARIANTS = [
    ("f32", "f32", ()),
    ("q8_0 weights in f32", "f32", ()),
    ("f16", "f16", ()),
    ("q8_0", "q8_0", ()),
    ("q8_0 + f16 token_embd", "q8_0", ("token_embd.weight", "output.weight")),
    ("q8_0 + f16 ffn_down", "q8_0", ("ffn_down.weight",)),
    ("q8_0 + f16 ffn_gate/up", "q8_0", ("ffn_gate.weight", "ffn_up.weight")),
    ("q8_0 + f16 attn", "q8_0", ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight")),
    ("q8_0 + f16 ssm_in/out", "q8_0", ("ssm_in.weight", "ssm_out.weight")),
    ("q8_0 + f16 token_embd, ffn_gate/up", "q8_0", ("token_embd.weight", "ffn_gate.weight", "ffn_up.weight")),
    ("q8_0 + f16 token_embd, mixers", "q8_0", ("token_embd.weight", *MIXERS)),
    (
        "q8_0 + f16 all but ffn_down",
        "q8_0",
        ("token_embd.weight", "ffn_gate.weight", "ffn_up.weight", *MIXERS),
    ),
    ("q8_0 + f16 first/last 4 layers", "q8_0", tuple(f"blk.{i}.{m}" for i in EDGE_LAYERS for m in MATRICES)),
]


def held_out_prompts(recipe, tokenizer, rows: int, tokens: int) -> tuple[list[list[int]], int]:
    """The first `tokens` tokens of the first `rows` held-out rows, and the length of their common prefix
    (the chat template's system prompt, the same in every row: scored once, not `rows` times)."""
    _, held_out = build_datasets(recipe.data, tokenizer, seed=recipe.seed)
    prompts = []
    for row in held_out.select(range(min(rows, len(held_out)))):
        ids = [t for t, keep in zip(row["input_ids"], row["attention_mask"]) if keep]
        prompts.append(ids[:tokens])
    shared = 0
    while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return prompts, shared


@torch.no_grad()
def reference(model, prompts: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Our (top-1, top-1 margin in nats) per position of each prompt, fp32."""
    out = []
    for prompt in prompts:
        logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        top2 = logprobs.topk(2, dim=-1)
        out.append((top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1]))
    return out


def q8_0_rounded(model):
    """A copy of `model` whose matrices (those a q8_0 file quantizes) hold their q8_0-rounded values."""
    import copy

    import gguf

    kind = gguf.GGMLQuantizationType.Q8_0
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if param.ndim == 2 and param.shape[-1] % 32 == 0 and ".conv1d." not in name:
                array = param.detach().float().numpy()
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind)))
    return rounded


@torch.no_grad()
def greedy_reference(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Our greedy continuation of each prompt up to its first pick that wins by less than GREEDY_MARGIN."""
    out = []
    for prompt in prompts:
        generated = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        top2 = torch.stack(generated.logits)[:, 0].float().topk(2, dim=-1).values
        clear = int(((top2[:, 0] - top2[:, 1]) > GREEDY_MARGIN).int().cumprod(0).sum())
        out.append(generated.sequences[0, len(prompt) : len(prompt) + clear].tolist())
    return out


def greedy_equal(path: Path, prompts, expected: list[list[int]], steps: int) -> dict:
    jobs = [{"kind": "greedy", "tokens": p, "steps": steps} for p in prompts]
    answers = llama_cpp.run(path, jobs, context=max(map(len, prompts)) + steps + 8, kv_type="F32")["answers"]
    equal = sum(a["tokens"][: len(e)] == e for a, e in zip(answers, expected))
    return {
        "greedy_equal": equal,
        "greedy_prompts": len(prompts),
        "greedy_clear_tokens": sum(map(len, expected)),
    }


def agreement(path: Path, prompts, expected, shared: int, kv_type: str) -> dict:
    jobs = [{"kind": "evaluate", "tokens": p, "top": 1} for p in prompts]
    answers = llama_cpp.run(path, jobs, context=max(map(len, prompts)) + 8, kv_type=kv_type)["answers"]
    same, margin = [], []
    for i, (answer, (top1, ours)) in enumerate(zip(answers, expected)):
        start = 0 if i == 0 else shared
        got = torch.tensor([position[0][0] for position in answer["positions"]])[start:]
        same.append(got == top1[start:])
        margin.append(ours[start:])
    same, margin = torch.cat(same), torch.cat(margin)
    clear = margin > CLEAR_NATS
    edges = [0.0, *MARGINS, float("inf")]
    by_margin = {}
    for low, high in itertools.pairwise(edges):
        inside = (margin >= low) & (margin < high)
        by_margin[f"{low:g}-{high:g}"] = {
            "disagree": int((~same[inside]).sum()),
            "positions": int(inside.sum()),
        }
    return {
        "top1_agreement": same.float().mean().item(),
        "positions": len(same),
        "clear_top1_agreement": same[clear].float().mean().item(),
        "clear_positions": int(clear.sum()),
        "disagreements_by_margin_nats": by_margin,
        "gguf_mib": path.stat().st_size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=["teacher", "student"], choices=["teacher", "student"])
    parser.add_argument("--variants", nargs="+", help="labels of VARIANTS to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "gguf_agreement.json")
    args = parser.parse_args()
    reason = llama_cpp.unavailable()
    if reason is not None:
        raise SystemExit(f"error: {reason}")
    recipe = load_recipe(args.run_dir / "recipe.yaml")
    teacher, tokenizer = load_teacher(recipe.teacher, dtype=torch.float32)
    prompts, shared = held_out_prompts(recipe, tokenizer, args.rows, args.tokens)
    models = {}
    if "teacher" in args.models:
        everywhere = StudentConfig(
            mixer="mamba2",
            attention_layers="uniform",
            attention_fraction=1.0,
            norm_init="ones",
            conv_init="random",
        )  # attention in every layer: the teacher's own weights
        models["teacher"] = hybrid_from_teacher(teacher, everywhere, seed=0).eval()
    if "student" in args.models:
        models["student"] = load_hybrid(args.run_dir / "final").float().eval()
    fields = tokenizer_from_gguf(asset_path("smollm2"))
    variants = [v for v in VARIANTS if args.variants is None or v[0] in args.variants]
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name, model in models.items():
        expected = reference(model, prompts)
        for label, outtype, keep in variants:
            written = q8_0_rounded(model) if label == "q8_0 weights in f32" else model
            with tempfile.TemporaryDirectory() as folder:
                path = write_gguf(written, Path(folder) / "m.gguf", outtype, fields, f16_tensors=keep)
                result = agreement(path, prompts, expected, shared, "F32" if outtype == "f32" else "F16")
                if label == "f32":
                    starts = [p[:GREEDY_PROMPT] for p in prompts]
                    greedy = greedy_reference(model, starts, GREEDY_STEPS)
                    result |= greedy_equal(path, starts, greedy, GREEDY_STEPS)
            results.setdefault(name, {})[label] = result
            print(
                f"{name:<8} {label:<24} top-1 {result['top1_agreement']:.4f} of {result['positions']}  "
                f"clear {result['clear_top1_agreement']:.4f} of {result['clear_positions']}  "
                f"{result['gguf_mib']:.0f} MiB"
                + (
                    f"  greedy equal {result['greedy_equal']}/{result['greedy_prompts']}"
                    if "greedy_equal" in result
                    else ""
                ),
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
