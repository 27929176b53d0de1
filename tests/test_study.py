"""The study (scripts/study*.py): every arm is a valid recipe with the budget it claims, and the docs keep arms run elsewhere."""

import json
import sys
from pathlib import Path

import pytest

from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the study's parts import each other by name, as scripts do
import study_arms
import study_runs


@pytest.mark.parametrize("name", list(study_arms.ARMS))
def test_every_arm_is_a_valid_recipe_with_its_budget(name, tmp_path):
    recipe = load_recipe(study_arms.BASE, study_arms.arm_overrides(name, tmp_path, scale=0.5))
    budget = [int(tokens * 0.5) for tokens in study_arms.ARMS[name][2]]
    if recipe.student.attention_layers == "auto":
        assert recipe.selection.align.max_tokens == budget.pop(0)
        assert recipe.selection.align.activations == "cached"
    stages = [stage.max_tokens for stage in recipe.stages]
    assert stages == [tokens for tokens in budget if tokens], (stages, budget)
    assert recipe.output_dir == str(tmp_path / name)


def test_align_scale_scales_only_the_alignment_of_every_layer(tmp_path):
    recipe = load_recipe(study_arms.BASE, study_arms.arm_overrides("attn25-mamba2-2h", tmp_path, 0.45, 0.6))
    align, layerwise, end_to_end = study_arms.ARMS["attn25-mamba2-2h"][2]
    assert recipe.selection.align.max_tokens == int(align * 0.6)
    assert [stage.max_tokens for stage in recipe.stages] == [int(layerwise * 0.45), int(end_to_end * 0.45)]


# each frontier recipe -> the study arm whose point it is (at the arm's own budgets)
FRONTIER = {"attn50": "attn50-mamba2-2h", "attn25": "attn25-mamba2-2h-more-layerwise", "attn12": "attn12-mamba2-2h",
            "attn0": "attn0-mamba2-2h"}


@pytest.mark.parametrize("name", list(FRONTIER))
def test_each_frontier_recipe_is_the_study_arm_behind_its_point(name, tmp_path):
    recipe = load_recipe(ROOT / f"recipes/smollm2-135m/frontier/{name}.yaml")
    studied = load_recipe(study_arms.BASE, study_arms.arm_overrides(FRONTIER[name], tmp_path, 1.0, None))
    assert recipe.model_dump(exclude={"output_dir"}) == studied.model_dump(exclude={"output_dir"})


def test_arms_without_outputs_keep_their_earlier_rows(tmp_path):
    arm = {"comparison": "base", "mixer": "mamba2", "attention_fraction": 0.5, "perplexity_ratio": 2.0,
           "kl_to_teacher": 0.8, "cpu_hours": 0.2}
    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps({"teacher": {"perplexity": 4.9}, "arms": {"attn50-mamba2": arm, "gone": arm}}))
    results = study_runs.collect(tmp_path / "out", list(study_arms.ARMS), None, [], 1, study_runs.load_table(earlier))
    assert results["arms"] == {"attn50-mamba2": {**arm, "kept": True}}  # an arm no longer in ARMS is dropped
    assert results["teacher"] == {"perplexity": 4.9}
