"""Passkey retrieval (needle in a haystack) built from held-out text.

A five-digit passkey sentence is hidden at a relative depth inside held-out text, the prompt is cut to a
given length in tokens, and the model is asked for the key (greedy decoding). Lengths beyond the
distillation length show whether the Mamba layers carry information further than they were trained on.
Chat models get the prompt as a user turn and the answer starts the assistant turn.
"""

from __future__ import annotations

import random
import re

import torch

from distill.errors import UserError

INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_START = "The pass key is"


def haystack_tokens(held_out, tokenizer) -> list[int]:
    """The held-out rows' real tokens as one stream, special tokens (chat markup, padding) dropped."""
    special = set(tokenizer.all_special_ids)
    tokens = [
        token
        for row in held_out
        for token, keep in zip(row["input_ids"], row["attention_mask"])
        if keep and token not in special
    ]
    if len(tokens) < 256:
        raise UserError(
            f"the held-out set has only {len(tokens)} text tokens; the passkey test needs at least 256"
        )
    return tokens


def _chat_wrap(tokenizer, user: str) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        return f"{user}\n{ANSWER_START}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return prompt + ANSWER_START


def make_prompt(tokenizer, filler: list[int], length: int, depth: float, key: int, offset: int) -> list[int]:
    """Token ids of a prompt of about `length` tokens with the passkey sentence at `depth` of the filler."""
    needle = NEEDLE.format(key=key)
    overhead = len(tokenizer(_chat_wrap(tokenizer, f"{INTRO}\n\n\n{needle}\n\n{QUESTION}")).input_ids)
    n_fill = length - overhead
    if n_fill < 16:
        raise UserError(
            f"passkey length {length} is too short for the prompt ({overhead} tokens); use >= {overhead + 16}"
        )
    window = [filler[(offset + i) % len(filler)] for i in range(n_fill)]
    cut = round(depth * n_fill)
    before, after = tokenizer.decode(window[:cut]), tokenizer.decode(window[cut:])
    user = f"{INTRO}\n{before}\n{needle}\n{after}\n{QUESTION}"
    return tokenizer(_chat_wrap(tokenizer, user)).input_ids


def _answer(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group() if match else None


@torch.no_grad()
def passkey_accuracy(
    model,
    tokenizer,
    filler: list[int],
    lengths: list[int],
    depths: list[float],
    trials: int = 3,
    seed: int = 0,
) -> dict:
    """Accuracy per (depth, length): `{"lengths", "depths", "accuracy": [[...] per depth], ...}`."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    accuracy, prompt_tokens = [], {}
    for depth in depths:
        row = []
        for length in lengths:
            correct = 0
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                ids = make_prompt(tokenizer, filler, length, depth, key, rng.randrange(len(filler)))
                prompt_tokens[length] = len(ids)
                out = model.generate(
                    torch.tensor([ids], device=device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                    max_new_tokens=8,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
                correct += _answer(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)) == str(key)
            row.append(correct / trials)
        accuracy.append(row)
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "accuracy": accuracy,
        "trials": trials,
        "prompt_tokens": prompt_tokens,
    }


def mean_accuracy(grid: dict) -> float:
    cells = [acc for row in grid["accuracy"] for acc in row]
    return sum(cells) / len(cells)
