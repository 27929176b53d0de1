"""A run's folder layout: the one place that knows where each output of an `output_dir` lives.

    output_dir/
      recipe.yaml            the resolved recipe (attention layers as a list), written once before training
      run.log                everything logged at INFO and above
      selection/             the selection stage (recipes with a `selection` section); scores.json: the choice
      stage{i}-{name}/       one folder per stage of `stages`
      final/                 the student, tokenizer and remote code (weights linked to the last stage's)
      eval/                  report.json, report.md and the plots
      export/{format}/       one folder per export format

A stage folder holds `checkpoints/` while it trains, `metrics.jsonl`/`metrics.csv`, then `final/` (the
student after the stage) and `summary.json`, written last, which marks the stage finished.
"""

from __future__ import annotations

import json
from pathlib import Path


class RunLayout:
    """The paths of one run's outputs under `root` (its output_dir)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def selection(self) -> Path:
        return self.root / "selection"

    @property
    def selection_record(self) -> Path:
        """The attention layers chosen from data and the scores behind the choice (eval's report reads it)."""
        return self.selection / "scores.json"

    def stage(self, index: int, name: str) -> Path:
        return self.root / f"stage{index}-{name}"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def export(self, fmt: str) -> Path:
        return self.root / "export" / fmt

    def stage_summaries(self, names: list[str]) -> list[dict]:
        """Each stage's summary (only its name where the stage has not finished)."""
        return [{"name": name, **(read_summary(self.stage(index, name)) or {})}
                for index, name in enumerate(names)]


# ----------------------------------------------------------------------------- inside a stage folder


def summary_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / "summary.json"


def final_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / "final"


def checkpoints_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / "checkpoints"


def read_summary(stage_dir: Path) -> dict | None:
    """The summary a stage folder holds, or None."""
    path = summary_path(stage_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def finished_summary(stage_dir: Path) -> dict | None:
    """The stage's summary if it completed earlier, else None."""
    summary = read_summary(stage_dir)
    return summary if summary and summary.get("finished") else None
