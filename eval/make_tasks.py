"""Build the shipped lm-eval task data in `eval/tasks/` from ShareGPT (run once; the output is committed).

    python -m distill.eval.make_tasks --source ShareGPT_V3_unfiltered_cleaned_split.json

Both tasks use the assistant replies of the *last* `--conversations` conversations of the file (their ids are
kept in every row so a data split can exclude them):

- `sharegpt_ppl.jsonl`: one reply per row (`text`, the first `--ppl-rows` replies), for the
  loglikelihood_rolling perplexity task.
- `sharegpt_next_sentence.jsonl`: a 4-way multiple-choice task. `context` is the start of a reply cut at
  a sentence end; the choices are the sentence that really follows and three sentences of similar length
  drawn from other replies. A model that follows the discourse beats the 25% chance level; nothing in the
  choices' surface form gives the answer away (all are whole sentences from the same corpus).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from distill.errors import UserError

TASKS_DIR = Path(__file__).parent / "tasks"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def read_sharegpt(path: Path) -> list[dict]:
    """Every complete conversation object in the file (the shipped JSON may be cut off mid-record)."""
    text = path.read_text(encoding="utf-8")
    decoder, skip = json.JSONDecoder(), re.compile(r"[\s,]*")
    index, records = text.index("[") + 1, []
    while True:
        index = skip.match(text, index).end()
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return records
        records.append(record)


def _sentences(reply: str) -> list[str]:
    first_paragraph = reply.strip().split("\n")[0]
    return [s.strip() for s in _SENTENCE_END.split(first_paragraph) if 20 <= len(s.strip()) <= 300]


def build(
    records: list[dict], conversations: int, seed: int, max_chars: int, ppl_rows: int
) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    replies = [
        (record["id"], turn["value"])
        for record in records[-conversations:]
        for turn in record.get("conversations", [])
        if turn.get("from") == "gpt" and len(turn.get("value", "")) >= 200 and turn["value"].isascii()
    ]
    ppl = [{"id": rid, "text": reply[:max_chars]} for rid, reply in replies[:ppl_rows]]
    pool = [(rid, s) for rid, reply in replies for s in _sentences(reply)]
    mc = []
    for rid, reply in replies:
        sentences = _sentences(reply)
        if len(sentences) < 3:
            continue
        cut = rng.randrange(2, len(sentences))
        answer = sentences[cut]
        similar = [s for other, s in pool if other != rid and 0.5 <= len(s) / len(answer) <= 2.0]
        if len(similar) < 3:
            continue
        choices = rng.sample(similar, 3) + [answer]
        rng.shuffle(choices)
        mc.append(
            {
                "id": rid,
                "context": " ".join(sentences[:cut]),
                "choices": choices,
                "label": choices.index(answer),
            }
        )
    return ppl, mc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source", type=Path, required=True, help="ShareGPT_V3_unfiltered_cleaned_split.json"
    )
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--max-chars", type=int, default=1500, help="perplexity text per row is cut here")
    parser.add_argument("--ppl-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.source.is_file():
        raise UserError(f"--source {args.source}: no such file; pass the ShareGPT JSON file")
    ppl, mc = build(read_sharegpt(args.source), args.conversations, args.seed, args.max_chars, args.ppl_rows)
    for name, rows in (("sharegpt_ppl.jsonl", ppl), ("sharegpt_next_sentence.jsonl", mc)):
        with open(TASKS_DIR / name, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {len(rows)} rows to {TASKS_DIR / name}")


if __name__ == "__main__":
    main()
