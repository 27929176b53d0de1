"""`evaluate` end to end on tiny models: report.json keys, report.md, plots, stage logs read robustly."""

import json

import pytest
import torch
from conftest import REFERENCE_STUDENT
from datasets import Dataset
from test_eval_lm_eval import save_tiny_checkpoint

from distill.eval.evaluation import evaluate
from distill.eval.report import markdown_table
from distill.recipe import EvalConfig, StudentConfig, recipe_from_dict

TEXT = "Mamba layers keep a fixed-size state, so decoding does not slow down as the context grows. " * 6


def _held_out(tokenizer, rows: int = 6, length: int = 64) -> Dataset:
    ids = tokenizer(TEXT).input_ids
    data = {"input_ids": [], "attention_mask": [], "position_ids": [], "labels": []}
    for i in range(rows):
        row = ids[i * 7 : i * 7 + length]
        data["input_ids"].append(row)
        data["attention_mask"].append([1] * length)
        data["position_ids"].append(list(range(length)))
        data["labels"].append([-100] + row[1:])
    return Dataset.from_dict(data)


def _run_dir(tmp_path):
    run = tmp_path / "run"
    recipe = recipe_from_dict(
        {
            "stages": [{"name": "layerwise", "max_tokens": 1000}, {"name": "end_to_end", "max_tokens": 2000}],
            "output_dir": str(run),
        }
    )
    (run / "stage0-layerwise").mkdir(parents=True)
    rows = [{"step": s, "tokens": 100 * s, "loss": 1.0 / s} for s in range(1, 6)]
    log = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "tok'  # cut off by an interrupted run
    (run / "stage0-layerwise" / "metrics.jsonl").write_text(log)
    (run / "recipe.yaml").write_text(recipe.dump())  # stage1 has no metrics log at all
    stages = [
        {"name": "layerwise", "tokens": 1000, "steps": 5, "wall_time_s": 3.5, "final_loss": 0.2},
        {"name": "end_to_end", "tokens": 2000, "steps": 10, "wall_time_s": 7.0, "final_loss": 1.5},
    ]
    return run, {"recipe": "recipes/demo.yaml", "output_dir": str(run), "stages": stages, "wall_time_s": 12.0}


@pytest.fixture
def models(tmp_path):
    from distill.init import hybrid_from_teacher

    teacher, tokenizer = save_tiny_checkpoint(tmp_path / "teacher")
    student = hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, attention_fraction=0.5), seed=0)
    return teacher, student, tokenizer


def test_report_keys_tables_and_loss_plot(tmp_path, models):
    teacher, student, tokenizer = models
    run, run_info = _run_dir(tmp_path)
    report = evaluate(
        EvalConfig(max_sequences=4),
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        held_out=_held_out(tokenizer),
        out_dir=run / "eval",
        run_info=run_info,
    )
    saved = json.loads((run / "eval" / "report.json").read_text())
    assert saved["teacher"]["perplexity"] == report["teacher"]["perplexity"]  # JSON keeps a float exactly
    for key in ("perplexity", "kl_to_teacher", "top1_agreement"):
        assert isinstance(saved["student"][key], float)
    assert saved["student"]["kl_to_teacher"] > 0
    assert [s["tokens"] for s in saved["stages"]] == [1000, 2000]
    assert saved["recipe"]["stages"][1]["name"] == "end_to_end"  # the resolved recipe, not just its path
    assert saved["plots"] == ["training_loss.png"]
    assert (run / "eval" / "training_loss.png").stat().st_size > 10_000
    md = (run / "eval" / "report.md").read_text()
    assert markdown_table(report) in md
    assert "| 1 | end_to_end | 2000 | 10 | 7 | 1.5 |" in md
    assert "held-out perplexity" in markdown_table(report)


@pytest.mark.slow
def test_speed_and_needle_sections(tmp_path, models):
    teacher, student, tokenizer = models
    cfg = EvalConfig(
        max_sequences=2,
        speed=True,
        speed_contexts=[16, 32],
        speed_batch_sizes=[1],
        speed_steps=1,
        needle=True,
        needle_lengths=[300],
        needle_depths=[0.5],
        needle_trials=1,
    )
    report = evaluate(
        cfg,
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        held_out=_held_out(tokenizer),
        out_dir=tmp_path / "eval",
        run_info={},
    )
    assert {r["model"] for r in report["speed"]} == {"teacher", "student"}
    assert set(report["needle"]) == {"teacher", "student"}
    assert 0.0 <= report["student"]["needle_accuracy"] <= 1.0
    assert report["plots"] == ["decode_speed.png", "decode_memory.png", "needle.png"]
    assert "decode tok/s, batch 1, context 32" in markdown_table(report)
    assert torch.tensor(report["needle"]["student"]["accuracy"]).shape == (1, 1)
