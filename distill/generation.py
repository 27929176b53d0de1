"""Answers sampled from a model, for the stages that train on generations and for the generation judge.

Prompts come from rows in the batch format: in each document, the tokens before its first training target
(the system and user turns and the assistant header, with the chat template already applied), and the answer
is the run of target tokens that follows (the first assistant turn). Sampling runs a batch of left-padded
prompts through the model's cache (a recurrent state for Mamba layers, KV for attention layers), one token
per step, drawing from a `torch.Generator` so a run that reseeds it from its step number resumes exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import UserError


@dataclass
class Exchange:
    """One prompt (token ids, chat template applied) and the answer the data gives it."""

    prompt: list[int]
    answer: list[int]


def exchanges(dataset, max_prompt_tokens: int) -> list[Exchange]:
    """The first exchange of every document of every row whose prompt fits in `max_prompt_tokens`."""
    columns = dataset.with_format("numpy")[:]
    found = []
    for ids, mask, positions, labels in zip(
        columns["input_ids"], columns["attention_mask"], columns["position_ids"], columns["labels"]
    ):
        real = int(mask.sum())
        starts = [int(s) for s in np.flatnonzero(positions[:real] == 0)] + [real]
        for start, end in itertools.pairwise(starts):
            targets = np.flatnonzero(labels[start:end] != -100)
            if not len(targets) or targets[0] == 0 or targets[0] > max_prompt_tokens:
                continue
            first = int(targets[0])
            last = first  # the answer: the contiguous targets from the first one
            while last + 1 < end - start and labels[start + last + 1] != -100:
                last += 1
            found.append(
                Exchange(ids[start : start + first].tolist(), ids[start + first : start + last + 1].tolist())
            )
    return found


def require_exchanges(found: list[Exchange], what: str, max_prompt_tokens: int) -> list[Exchange]:
    if not found:
        raise UserError(
            f"{what}: no prompt found (a prompt is the tokens before a document's first training target, "
            "at most "
            f"max_prompt_tokens = {max_prompt_tokens}); use chat data with data.loss_on: assistant, or raise "
            "max_prompt_tokens"
        )
    return found


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of int64, sequences aligned to the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.as_tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (padding gets 0 too)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def padding_id(model, tokenizer=None) -> int:
    """The padding id: the model's, else the tokenizer's, else 0 (padding is masked wherever it is used)."""
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    return 0 if pad is None else int(pad)


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = model.config.eos_token_id if eos is None else eos
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Answer each prompt: temperature 0 is greedy, otherwise sampling from softmax(logits / temperature).

    Returns (input_ids, attention_mask, answer_mask), each (B, P + max_new_tokens): the prompts left-padded,
    then the answers; an answer stops after its first end-of-sequence token, and what follows is padding
    (attention_mask 0). answer_mask is 1 on the answer tokens (the end-of-sequence token included)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    stop = torch.as_tensor(sorted(eos_ids(model)), dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    step_ids, step_pos = ids, positions(mask)
    answer, alive = [], []
    for _ in range(max_new_tokens):
        logits = (
            model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, cache=cache, use_cache=True)
            .logits[:, -1]
            .float()
        )
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            probs = F.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(done, pad_id, token)
        answer.append(token), alive.append(~done)
        done = done | torch.isin(token, stop)
        mask = torch.cat([mask, alive[-1].long()[:, None]], dim=-1)
        step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
        if bool(done.all()):
            break
    new = torch.stack(answer, dim=1)
    new_mask = torch.stack(alive, dim=1).long()
    missing = max_new_tokens - new.shape[1]
    new, new_mask = F.pad(new, (0, missing), value=pad_id), F.pad(new_mask, (0, missing))
    full_mask = torch.cat([mask[:, : ids.shape[1]], new_mask], dim=1)
    return torch.cat([ids, new], dim=1), full_mask, torch.cat([torch.zeros_like(ids), new_mask], dim=1)


def sampled_batches(
    model,
    prompts: list[list[int]],
    *,
    batch_size: int,
    seed: int,
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
):
    """`sample` over `prompts` in batches of `batch_size`, yielding (start, input_ids, attention_mask,
    answer_mask) per batch. Batch number k draws from a generator seeded with (seed, k) alone, so a batch's
    answers do not depend on how many tokens the batches before it drew."""
    device = next(model.parameters()).device
    for number, start in enumerate(range(0, len(prompts), batch_size)):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + number)
        ids, mask, answer = sample(
            model,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=generator,
            pad_id=pad_id,
        )
        yield start, ids, mask, answer


def answer_ids(input_ids: torch.Tensor, answer_mask: torch.Tensor) -> list[list[int]]:
    """Each row's answer tokens (end-of-sequence included when reached), as lists of ids."""
    return [row[answer.bool()].tolist() for row, answer in zip(input_ids, answer_mask)]


def answer_labels(input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """HF-style unshifted labels: the answer tokens, -100 elsewhere (so `loss_positions` picks the positions
    that predict them)."""
    return torch.where(answer_mask.bool(), input_ids, -100)


def forward_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """A left-padded batch as a model sees it without a cache."""
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": positions(attention_mask),
        "use_cache": False,
    }


def step_generator(seed: int, step: int, rows, device) -> torch.Generator:
    """The sampling generator of one micro-batch: a function of the stage seed, the step and the rows only
    (ints and tuples of ints hash the same in every process), so a resumed run draws the same samples."""
    key = hash((seed, step, tuple(int(r) for r in rows))) & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(key)
