"""Judge what the student generates, not only what it predicts under teacher forcing.

On held-out prompts (the first exchange of held-out conversations, never trained on), teacher and student
answer greedily and by sampling. The teacher scores every answer: its NLL per token of the student's answers
against that of its own answers gives a perplexity ratio exp(NLL_student - NLL_teacher) (1 when the student
writes what the teacher finds as likely as its own text). The greedy answers are also compared token by
token: the mean length of the prefix the student shares with the teacher. A student trained only on teacher-
forced text can score well on held-out perplexity and still drift once it conditions on its own tokens.
"""

from __future__ import annotations

import math

import torch

from distill.generation import answer_ids, exchanges, forward_inputs, sampled_batches


@torch.no_grad()
def answer_nll(
    teacher, ids: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor
) -> tuple[list[float], list[int]]:
    """The teacher's NLL (nats) of each left-padded prompt + answer row's answer tokens, summed per row, and
    their counts."""
    device = next(teacher.parameters()).device
    ids, mask, answer = ids.to(device), mask.to(device), answer.to(device)
    hidden = teacher.model(**forward_inputs(ids, mask)).last_hidden_state
    positions = answer[:, 1:].bool()  # position t predicts token t + 1
    logits = hidden[:, :-1][positions].float() @ teacher.lm_head.weight.float().T
    targets = ids[:, 1:][positions]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    rows = positions.nonzero()[:, 0]  # the row of each answer token, in the order of `nll`
    per_row = torch.zeros(len(ids), dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)
    return per_row.tolist(), positions.sum(1).tolist()


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def answer_and_score(model, teacher, prompts, max_new_tokens, temperature, batch_size, seed, pad_id):
    """`model`'s answers to `prompts` (batched, each batch's sampling seeded by `seed` and its number), and
    the teacher's summed NLL and token count of each."""
    answers, nlls, counts = [], [], []
    batches = sampled_batches(
        model,
        prompts,
        batch_size=batch_size,
        seed=seed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        pad_id=pad_id,
    )
    for _, ids, mask, answer in batches:
        answers += answer_ids(ids, answer)
        nll, tokens = answer_nll(teacher, ids, mask, answer)
        nlls, counts = nlls + nll, counts + tokens
    return answers, nlls, counts


def judge_generations(
    student,
    teacher,
    tokenizer,
    held_out,
    *,
    prompts: int = 24,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    examples: int = 3,
    max_prompt_tokens: int = 256,
    teacher_side: dict | None = None,
    sampled: bool = True,
) -> dict | None:
    """Generation metrics on the first `prompts` held-out prompts (None when the rows have no prompts);
    `sampled=False` judges the greedy answers only (half the cost).

    `teacher_side`, a dict, holds the teacher's answers and their scores: an empty one is filled, a filled one
    (from a call with the same teacher, prompts and settings) is used instead of answering again, so judging
    several students costs the teacher's generations once."""
    found = exchanges(held_out, max_prompt_tokens)[:prompts]
    if not found:
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: dict[str, list[list[int]]] = {}
    scores: dict[str, list[float]] = {}
    per_prompt: dict[str, dict[str, list]] = {}
    modes = {"greedy": 0.0, "sampled": temperature} if sampled else {"greedy": 0.0}
    for mode, temp in modes.items():
        for name, model in (("teacher", teacher), ("student", student)):
            key = f"{name}_{mode}"
            if teacher_side and key in teacher_side:
                answers[key], nlls, counts = (teacher_side[key][k] for k in ("answers", "nll", "tokens"))
            else:
                answers[key], nlls, counts = answer_and_score(
                    model,
                    teacher,
                    [ex.prompt for ex in found],
                    max_new_tokens,
                    temp,
                    batch_size,
                    seed,
                    pad_id,
                )
            scores[key] = [sum(nlls) / max(sum(counts), 1), sum(counts) / len(found)]
            per_prompt[key] = {"nll": nlls, "tokens": counts}
            if teacher_side is not None and name == "teacher":
                teacher_side[key] = {"answers": answers[key], **per_prompt[key]}
    result = {"prompts": len(found), "max_new_tokens": max_new_tokens, "temperature": temperature}
    for mode in modes:
        teacher_nll, student_nll = scores[f"teacher_{mode}"][0], scores[f"student_{mode}"][0]
        result[mode] = {
            "teacher_nll_of_teacher": teacher_nll,
            "teacher_nll_of_student": student_nll,
            "perplexity_ratio": math.exp(student_nll - teacher_nll),
            "teacher_answer_length": scores[f"teacher_{mode}"][1],
            "student_answer_length": scores[f"student_{mode}"][1],
        }
    prefixes = [shared_prefix(s, t) for s, t in zip(answers["student_greedy"], answers["teacher_greedy"])]
    result["greedy"]["shared_prefix"] = sum(prefixes) / len(prefixes)
    per_prompt["shared_prefix"] = prefixes
    result["per_prompt"] = per_prompt  # the teacher's summed NLL and token count of each answer, for spreads
    result["examples"] = [
        {
            "prompt": tokenizer.decode(ex.prompt, skip_special_tokens=False),
            "teacher": tokenizer.decode(t, skip_special_tokens=True),
            "student": tokenizer.decode(s, skip_special_tokens=True),
        }
        for ex, t, s in zip(found[:examples], answers["teacher_greedy"], answers["student_greedy"])
    ]
    return result
