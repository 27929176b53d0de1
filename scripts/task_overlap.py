"""How many of the shipped lm-eval tasks' ShareGPT conversations a recipe's data split trains on.

    python scripts/task_overlap.py recipes/smollm2-135m/study/base.yaml [--rows 256 1480 2540]

The shipped tasks (`eval/tasks/*.jsonl`) keep each conversation's id. This takes the split's own order of the
usable conversations (`distill.data.split_order`: held-out first, then the `max_conversations` training pool)
and reports where the task conversations fall. It does not tokenize, so conversations that the split later drops for having no
target token inside `max_length` still count (a few per thousand); the positions are exact otherwise.
`--rows` gives training rows consumed (steps x batch size, summed over stages): rows are drawn in a seeded
permutation of the pool's rows, so the expected number of task conversations seen is proportional.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.data import ParseStats, split_order
from distill.errors import UserError
from distill.recipe import load_recipe

TASKS = Path(__file__).resolve().parent.parent / "eval" / "tasks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--rows", type=int, nargs="*", default=[], help="training rows consumed by a run")
    parser.add_argument("--pool-rows", type=int, default=None,
                        help="rows the training pool packs into (default: one per conversation)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    cfg = recipe.data
    task_ids = {json.loads(line)["id"] for path in TASKS.glob("*.jsonl") for line in path.read_text().splitlines()}
    ids = [record.get("id") for record, _ in split_order(cfg, recipe.seed, ParseStats())]
    position = {doc_id: i for i, doc_id in enumerate(ids)}
    found = sorted(position[t] for t in task_ids if t in position)
    held, pool = cfg.held_out_size, cfg.max_conversations or len(ids)
    in_held = sum(p < held for p in found)
    in_pool = sum(held <= p < held + pool for p in found)
    print(f"{len(task_ids)} task conversations, {len(found)} found among {len(ids)} usable ones: "
          f"{in_held} in the held-out set, {in_pool} in the {pool}-conversation training pool")
    pool_rows = args.pool_rows or min(pool, len(ids) - held)
    for rows in args.rows:
        print(f"  {rows} training rows of {pool_rows}: about {in_pool * min(rows, pool_rows) / pool_rows:.1f} "
              "task conversations seen in training")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # a bad recipe path or source: one line, as the distill CLI prints it
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
