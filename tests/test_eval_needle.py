"""Passkey prompts and scoring; the model's ability itself is what the report measures, not a test."""

import re

import torch
from test_eval_lm_eval import byte_tokenizer

from distill.eval.needle import INTRO, QUESTION, haystack_tokens, make_prompt, mean_accuracy, passkey_accuracy

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. " * 8


class Oracle(torch.nn.Module):
    """Stands in for a model: answers with the passkey it finds in the prompt (or a wrong one)."""

    def __init__(self, tokenizer, wrong: bool = False):
        super().__init__()
        self.tokenizer, self.wrong = tokenizer, wrong
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, **kwargs):
        key = int(re.search(r"pass key is (\d+)", self.tokenizer.decode(input_ids[0])).group(1))
        answer = self.tokenizer(f" {key + 1 if self.wrong else key}.", add_special_tokens=False).input_ids
        return torch.cat([input_ids, torch.tensor([answer])], dim=1)


def test_prompt_length_and_depth():
    tokenizer = byte_tokenizer()
    filler = tokenizer(TEXT).input_ids
    for depth in (0.0, 0.5, 1.0):
        ids = make_prompt(tokenizer, filler, length=600, depth=depth, key=12345, offset=7)
        text = tokenizer.decode(ids)
        assert abs(len(ids) - 600) <= 2  # byte tokens: decode/encode round trip is exact up to the joins
        needle = "The pass key is 12345. Remember it. 12345 is the pass key."
        before = text[text.index(INTRO) + len(INTRO) : text.index(needle)]
        after = text[text.index(needle) + len(needle) : text.index(QUESTION)]
        # the cut is depth * n_fill rounded to a token (half a byte at most), and each side carries two of the
        # prompt's newline joins
        assert abs(len(before) / (len(before) + len(after)) - depth) <= 2.5 / (len(before) + len(after))
        assert text.rstrip().endswith("The pass key is")


def test_scoring_uses_the_generated_answer():
    tokenizer = byte_tokenizer()
    filler = tokenizer(TEXT).input_ids
    right = passkey_accuracy(Oracle(tokenizer), tokenizer, filler, [300, 500], [0.1, 0.9], trials=2)
    wrong = passkey_accuracy(
        Oracle(tokenizer, wrong=True), tokenizer, filler, [300, 500], [0.1, 0.9], trials=2
    )
    assert right["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and mean_accuracy(right) == 1.0
    assert mean_accuracy(wrong) == 0.0
    assert set(right["prompt_tokens"]) == {300, 500}


def test_haystack_drops_padding_and_special_tokens():
    tokenizer = byte_tokenizer()
    ids = tokenizer(TEXT).input_ids[:300]
    rows = [{"input_ids": ids + [tokenizer.eos_token_id] * 4, "attention_mask": [1] * 301 + [0] * 3}]
    assert haystack_tokens(rows, tokenizer) == ids
