"""Teacher pseudo-labels: the teacher answers the training prompts once, and the stages train on its answers.

MambaInLlama distils on the teacher's own answers: the student then learns the distribution it is compared
with at generation time, not the (often other-model) answers of the data. Each training document contributes
its first exchange's prompt; the answers are cached under `$MAMBA_DISTILL_CACHE/teacher_answers`, keyed by
the teacher (its config and a checksum of its weights), the prompts and the sampling settings, so later runs
and other recipes with the same data reuse them. Held-out rows keep the data's answers.
"""

from __future__ import annotations

import hashlib
import json
import logging

from tqdm.auto import tqdm

from distill.assets import cache_root
from distill.errors import UserError
from distill.files import write_text
from distill.generation import answer_ids, exchanges, sampled_batches

logger = logging.getLogger(__name__)


def teacher_identity(teacher) -> list:
    """What distinguishes one teacher's answers from another's: its config and a checksum of its head."""
    return [
        teacher.config.to_json_string(use_diff=False),
        float(teacher.lm_head.weight.detach().double().sum()),
    ]


def teacher_answers(
    teacher,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    pad_id: int,
) -> list[list[int]]:
    """The teacher's answer (token ids, end-of-sequence included when reached) to each prompt, cached."""
    key = json.dumps([teacher_identity(teacher), prompts, max_new_tokens, temperature, seed, pad_id])
    path = cache_root() / "teacher_answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        logger.info("teacher answers: reusing %s", path)
        return json.loads(path.read_text())
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    batches = sampled_batches(
        teacher,
        [prompts[i] for i in order],
        batch_size=batch_size,
        seed=seed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        pad_id=pad_id,
    )
    answers: list[list[int]] = [[] for _ in prompts]
    total = -(-len(prompts) // batch_size)
    for start, ids, _, answer in tqdm(batches, total=total, desc="teacher answers", unit="batch"):
        for i, tokens in zip(order[start:], answer_ids(ids, answer)):
            answers[i] = tokens
    write_text(path, json.dumps(answers))
    return answers


def teacher_answer_rows(train, teacher, data_cfg, seed: int, pad_id: int):
    """The training rows rebuilt from the teacher's answers to their prompts (packed like the data's rows)."""
    import datasets

    from distill.data import COLUMNS, _rows

    max_prompt = data_cfg.max_length - min(data_cfg.answer_max_new_tokens, data_cfg.max_length // 2)
    found = exchanges(train, max_prompt)
    prompts = [ex.prompt for ex in found]
    answers = teacher_answers(
        teacher,
        prompts,
        max_new_tokens=data_cfg.answer_max_new_tokens,
        temperature=data_cfg.answer_temperature,
        batch_size=data_cfg.answer_batch_size,
        seed=seed,
        pad_id=pad_id,
    )
    docs = [
        ((p + a)[: data_cfg.max_length], ([0] * len(p) + [1] * len(a))[: data_cfg.max_length])
        for p, a in zip(prompts, answers)
        if a
    ]
    if not docs:
        raise UserError(
            "data.answers: teacher found no prompt in the training rows (the tokens before a "
            "document's first assistant token); use chat data with data.loss_on: assistant"
        )
    rows = list(_rows(iter(docs), data_cfg, pad_id))
    logger.info("data: %d rows of the teacher's answers to %d prompts", len(rows), len(docs))
    features = datasets.Features({name: datasets.Sequence(datasets.Value("int64")) for name in COLUMNS})
    return datasets.Dataset.from_list(rows, features=features)
