"""`distill eval`: any HF folder against itself, a run's final/ folder, and one-line user errors."""

import json

import pytest
from conftest import REFERENCE_STUDENT
from test_eval_lm_eval import save_tiny_checkpoint

from distill.cli import main as distill_main
from distill.eval.cli import main

SENTENCES = [
    "State space models carry a fixed-size state from token to token.",
    "Attention layers keep every past key and value in their cache.",
    "A hybrid keeps a few attention layers and replaces the rest.",
    "Distillation trains the student to match the teacher's next-token distribution.",
]


@pytest.fixture
def text_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBA_DISTILL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "texts.jsonl"
    path.write_text(
        "".join(json.dumps({"text": " ".join(SENTENCES[i:] + SENTENCES[:i])}) + "\n" for i in range(4)) * 3
    )
    return path


def test_teacher_against_itself(tmp_path, text_data):
    save_tiny_checkpoint(tmp_path / "llama")
    out = tmp_path / "report"
    args = [
        "--student",
        str(tmp_path / "llama"),
        "--teacher",
        str(tmp_path / "llama"),
        "--data",
        str(text_data),
        "--max-length",
        "64",
        "--max-sequences",
        "4",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    # the student is the teacher, loaded the same way and run on the same batches: the same logits bit for bit,
    # so every KL term p (log p - log q) is exactly 0 and the perplexities are equal
    assert report["student"]["kl_to_teacher"] == 0
    assert report["student"]["top1_agreement"] == 1.0
    assert report["student"]["perplexity"] == report["teacher"]["perplexity"]
    assert report["held_out"]["sequences"] == 4


def test_run_output_folder(tmp_path, text_data):
    """`--student <run>/final` finds the run's recipe: its teacher, held-out split and stage summaries."""
    from distill.init import hybrid_from_teacher
    from distill.pipeline import save_final
    from distill.recipe import StudentConfig, recipe_from_dict

    teacher, tokenizer = save_tiny_checkpoint(tmp_path / "llama")
    run = tmp_path / "run"
    recipe = recipe_from_dict(
        {
            "teacher": {"source": str(tmp_path / "llama")},
            "data": {"source": str(text_data), "max_length": 64, "held_out_size": 3, "loss_on": "all"},
            "stages": [{"name": "end_to_end", "max_tokens": 1000}],
            "output_dir": str(run),
        }
    )
    (run / "stage0-end_to_end").mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.dump())
    (run / "stage0-end_to_end" / "summary.json").write_text(json.dumps({"tokens": 1024, "wall_time_s": 2.0}))
    save_final(hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, attention_fraction=0.5)), tokenizer, run / "final")
    assert main(["--student", str(run / "final")]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["stages"] == [{"name": "end_to_end", "tokens": 1024, "wall_time_s": 2.0}]
    assert report["held_out"]["sequences"] == 3
    assert report["student"]["kl_to_teacher"] > 0


def test_user_mistakes_print_one_line(tmp_path, capsys):
    assert distill_main(["eval", "--student", str(tmp_path / "missing"), "--teacher", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a checkpoint folder" in err
    save_tiny_checkpoint(tmp_path / "llama")
    assert distill_main(["eval", "--student", str(tmp_path / "llama")]) == 2
    assert "--teacher is required" in capsys.readouterr().err
