"""The `distill` CLI: malformed recipes give one `error:` line and exit 2; good ones validate and print."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.cli import main

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "recipes" / "smollm2-135m" / "hybrid50-mamba2.yaml"


@pytest.fixture
def teacher_dir(tmp_path):
    """A local teacher folder with only a config.json (4 layers): enough for `validate`."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    return folder


def recipe(tmp_path, teacher_dir, **sections):
    base = {"teacher": {"source": str(teacher_dir)}, "stages": [{"name": "end_to_end", "max_tokens": "1e4"}]}
    base.update(sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


MALFORMED = {
    "missing teacher": ({"teacher": {"source": "./checkpoints/no-such-teacher"}}, [],
                        "teacher.source = './checkpoints/no-such-teacher': no such folder"),
    "teacher not a string": ({"teacher": {"source": None}}, [], "teacher.source = None: Input should be a valid string"),
    "unknown key": ({"studnet": {"mixer": "mamba2"}}, [], "unknown key 'studnet'; did you mean 'student'?"),
    "layer out of range": ({"student": {"attention_layers": [0, 4]}}, [],
                           "student.attention_layers: layer 4 is out of range; the teacher has 4 layers"),
    "negative lr": ({"stages": [{"name": "layerwise", "max_tokens": 100, "lr": -0.1}]}, [],
                    "stages.0.lr = -0.1: Input should be greater than 0"),
    "empty stages": ({"stages": []}, [], "stages is empty; list at least one stage"),
    "wrong type": ({"data": {"max_length": "long"}}, [], "data.max_length = 'long': Input should be a valid integer"),
    "missing data file": ({"data": {"source": "data/missing.jsonl"}}, [],
                          "data.source = 'data/missing.jsonl': file not found"),
    "bad override": ({}, ["stages.2.lr=1e-3"], "--set stages.2.lr: index 2 does not exist"),
    "override without value": ({}, ["stages.0.lr"], "expected KEY=VALUE"),
    "unknown stage": ({"stages": [{"name": "distill_all", "max_tokens": 5}]}, [], "'distill_all' is not a stage"),
    "dpo beta": ({"stages": [{"name": "dpo", "max_tokens": 5, "beta": 0}]}, [], "beta = 0: Input should be greater than 0"),
    "fraction out of range": ({"student": {"attention_fraction": 1.5}}, [],
                              "student.attention_fraction = 1.5: Input should be less than or equal to 1"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_recipe_is_one_line_error(case, tmp_path, teacher_dir, capsys):
    sections, overrides, message = MALFORMED[case]
    path = recipe(tmp_path, teacher_dir, **sections)
    rc = main(["validate", str(path), *(f"--set={o}" for o in overrides)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("stages: [\n  {name: end_to_end\n")
    assert main(["validate", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML at line" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_validate_prints_the_resolved_recipe(tmp_path, teacher_dir, capsys):
    path = recipe(tmp_path, teacher_dir, student={"attention_layers": [1, 3]})
    assert main(["validate", str(path), "--set", "stages.0.max_tokens=2e5", "--set", "seed=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["stages"][0]["max_tokens"] == 200_000 and resolved["seed"] == 7
    assert resolved["stages"][0]["kl"] == "forward" and resolved["data"]["source"] == "sharegpt"  # defaults


def test_delegated_subcommands_get_their_argv(monkeypatch):
    import distill.export
    import distill.import_mil

    seen = []
    monkeypatch.setattr(distill.export, "main", lambda argv: seen.append(("export", argv)) or 0)
    monkeypatch.setattr(distill.import_mil, "main", lambda argv: seen.append(("import-mil", argv)) or 0)
    assert main(["export", "outputs/run/final", "--format", "bamba", "--out", "x"]) == 0
    assert main(["import-mil", "mil/", "--out", "y"]) == 0
    assert seen == [("export", ["outputs/run/final", "--format", "bamba", "--out", "x"]),
                    ("import-mil", ["mil/", "--out", "y"])]


@pytest.mark.slow
def test_real_entry_points_exit_2_without_traceback(tmp_path, teacher_dir):
    """The console script, `python -m distill` and `python distill/run.py` (what accelerate launches)."""
    bad = recipe(tmp_path, teacher_dir, stages=[{"name": "layerwise", "max_tokens": 10, "lr": -1}])
    distill_script = Path(sys.executable).with_name("distill")
    commands = [
        [str(distill_script), "validate", str(bad)],
        [sys.executable, "-m", "distill", "run", str(bad)],
        [sys.executable, str(ROOT / "distill" / "run.py"), str(bad), "--set", "stages.0.max_tokens=100"],
    ]
    for command in commands:
        done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.strip() == "error: stages.0.lr = -1: Input should be greater than 0", done.stderr
