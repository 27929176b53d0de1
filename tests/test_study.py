"""scripts/study.py: every arm is a valid recipe with the budget it claims, and the docs keep arms run elsewhere."""

import importlib.util
import json
from pathlib import Path

import pytest

from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


@pytest.mark.parametrize("name", list(study.ARMS))
def test_every_arm_is_a_valid_recipe_with_its_budget(name, tmp_path):
    recipe = load_recipe(study.BASE, study.arm_overrides(name, tmp_path, scale=0.5))
    budget = [int(tokens * 0.5) for tokens in study.ARMS[name][2]]
    if recipe.student.attention_layers == "auto":
        assert recipe.selection.align.max_tokens == budget.pop(0)
        assert recipe.selection.align.activations == "cached"
    stages = [stage.max_tokens for stage in recipe.stages]
    assert stages == [tokens for tokens in budget if tokens], (stages, budget)
    assert recipe.output_dir == str(tmp_path / name)


def test_arms_without_outputs_keep_their_earlier_rows(tmp_path):
    arm = {"comparison": "base", "mixer": "mamba2", "attention_fraction": 0.5, "perplexity_ratio": 2.0,
           "kl_to_teacher": 0.8, "cpu_hours": 0.2}
    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps({"teacher": {"perplexity": 4.9}, "arms": {"attn50-mamba2": arm, "gone": arm}}))
    results = study.collect(tmp_path / "out", list(study.ARMS), None, [], 1, earlier)
    assert results["arms"] == {"attn50-mamba2": {**arm, "kept": True}}  # an arm no longer in ARMS is dropped
    assert results["teacher"] == {"perplexity": 4.9}
