"""Preference pairs for the `dpo` stage, in TRL's formats, or built from the teacher and the student.

A file (.json array, .jsonl, .parquet) or a `datasets` name with `prompt`, `chosen` and `rejected` columns:
- conversational: `prompt` a list of messages, `chosen` / `rejected` lists with the assistant's turn; the
  prompt gets the chat template with the generation prompt, and each answer is what the template adds to it;
- standard: three strings, the answers continuing the prompt text (an end-of-sequence token is appended);
- tokenized: `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` instead.
`teacher_vs_student`: for each training prompt the teacher's greedy answer is chosen and the student's
sample rejected (pairs where both are equal teach nothing and are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.errors import UserError

TEACHER_VS_STUDENT = "teacher_vs_student"
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _records(source: str, split: str):
    import datasets

    path = Path(source).expanduser()
    try:
        if path.suffix in (".json", ".jsonl", ".parquet"):
            if not path.is_file():
                raise UserError(
                    f"pairs = {source!r}: file not found; fix the path or use pairs: {TEACHER_VS_STUDENT}"
                )
            builder = "parquet" if path.suffix == ".parquet" else "json"
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(source, split=split)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"pairs = {source!r}: could not load it with datasets ({first})") from None


def _answer(tokenizer, prompt, answer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids); an empty answer gives no ids."""
    if isinstance(prompt, list):  # conversational
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if not full.startswith(head):
            raise UserError(
                "pairs: the chat template does not extend the prompt with the answer; use standard "
                "(string) prompt/chosen/rejected columns"
            )
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        return ids, tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"] if answer else []
    ids = tokenizer(prompt)["input_ids"]
    return ids, tokenizer(answer, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ] if answer else []


def load_pairs(source: str, split: str, tokenizer, max_pairs: int | None) -> list[Pair]:
    """The pairs of `source` (see the module docstring), the first `max_pairs` of them."""
    rows = _records(source, split)
    columns = set(rows.column_names)
    tokenized = set(ID_COLUMNS) <= columns
    if not tokenized and not set(TEXT_COLUMNS) <= columns:
        missing = sorted(set(TEXT_COLUMNS) - columns)
        raise UserError(
            f"pairs = {source!r} has no column {', '.join(missing)} (it has {', '.join(sorted(columns))});"
            " give prompt/chosen/rejected (TRL's preference format)"
        )
    pairs = []
    for record in rows.select(range(min(len(rows), max_pairs or len(rows)))):
        if tokenized:
            pairs.append(Pair(*(list(record[c]) for c in ID_COLUMNS)))
            continue
        if tokenizer is None:
            raise UserError("pairs: text pairs need the teacher's tokenizer")
        prompt, chosen = _answer(tokenizer, record["prompt"], record["chosen"])
        _, rejected = _answer(tokenizer, record["prompt"], record["rejected"])
        if chosen and rejected:
            pairs.append(Pair(prompt, chosen, rejected))
    if not pairs:
        raise UserError(
            f"pairs = {source!r}: no usable pair (empty, or every chosen/rejected answer is empty)"
        )
    return pairs


def check_vocabulary(pairs: list[Pair], vocab_size: int, source: str) -> None:
    """Token ids the model cannot embed mean the pairs come from another tokenizer."""
    top = max(max(p.prompt + p.chosen + p.rejected) for p in pairs)
    if top >= vocab_size:
        raise UserError(
            f"pairs = {source!r}: token id {top} is outside the student's vocabulary ({vocab_size}); "
            "the pairs were tokenized with another tokenizer: give text columns or retokenize them "
            "with the teacher's tokenizer"
        )


def teacher_vs_student(
    teacher,
    student,
    found,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    pad_id: int,
    batch_size: int,
) -> list[Pair]:
    """Chosen: the teacher's greedy answer (cached, see distill.pseudo_labels); rejected: the student's
    sample."""
    from distill.generation import answer_ids, sampled_batches
    from distill.pseudo_labels import teacher_answers

    prompts = [ex.prompt for ex in found]
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed, "pad_id": pad_id}
    chosen = teacher_answers(teacher, prompts, temperature=0.0, **settings)
    pairs = []
    for start, ids, _, answer in sampled_batches(student, prompts, temperature=temperature, **settings):
        for row, rejected in enumerate(answer_ids(ids, answer), start):
            if chosen[row] and rejected and chosen[row] != rejected:
                pairs.append(Pair(prompts[row], chosen[row], rejected))
    if not pairs:
        raise UserError(
            "pairs: teacher_vs_student gave no pair (the student answered every prompt like the "
            "teacher); the dpo stage has nothing to learn: drop it"
        )
    return pairs
