"""The recipe schema: defaults, token counts, overrides, hints and cross-checks (in process, no torch)."""

from pathlib import Path

import pytest
import yaml

from distill.recipe import EndToEndStage, LayerwiseStage, RecipeError, load_recipe, recipe_from_dict

DEMO = Path(__file__).parents[1] / "recipes" / "smollm2-135m" / "hybrid50-mamba2.yaml"
E2E = {"name": "end_to_end", "max_tokens": 1000}


def test_demo_recipe_loads_and_round_trips(tmp_path):
    recipe = load_recipe(DEMO)
    assert [type(s) for s in recipe.stages] == [LayerwiseStage, EndToEndStage]
    assert recipe.student.attention_fraction == 0.5 and recipe.teacher.source == "smollm2-135m-instruct"
    (tmp_path / "resolved.yaml").write_text(recipe.dump())
    assert load_recipe(tmp_path / "resolved.yaml") == recipe


@pytest.mark.parametrize(("written", "tokens"), [(2e5, 200_000), ("2e5", 200_000), ("200k", 200_000),
                                                 ("1.5M", 1_500_000), ("1_000", 1000), (64, 64)])
def test_token_counts(written, tokens):
    assert recipe_from_dict({"stages": [{**E2E, "max_tokens": written}]}).stages[0].max_tokens == tokens


def test_overrides_are_validated_like_the_file():
    raw = {"stages": [{"name": "layerwise", "max_tokens": 10}, dict(E2E)]}
    recipe = recipe_from_dict(raw, ["stages.0.max_tokens=2e5", "stages.1.kl=jsd", "data.packing=false",
                                    "student.attention_layers=[1, 3]", "student.attention_fraction=null"])
    assert recipe.stages[0].max_tokens == 200_000 and recipe.stages[1].kl == "jsd"
    assert recipe.data.packing is False and recipe.student.attention_layers == [1, 3]
    with pytest.raises(RecipeError, match=r"stages.1.kl = 'kld': Input should be 'forward', 'reverse' or 'jsd'"):
        recipe_from_dict({"stages": [{"name": "layerwise", "max_tokens": 10}, dict(E2E)]}, ["stages.1.kl=kld"])
    with pytest.raises(RecipeError, match="index 3 does not exist"):
        recipe_from_dict({"stages": [dict(E2E)]}, ["stages.3.lr=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        recipe_from_dict({"stages": [dict(E2E)]}, ["stages.0.lr"])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"stagse": []}, "unknown key 'stagse'; did you mean 'stages'?"),
        ({"data": {"max_lenght": 5}, "stages": [E2E]}, "unknown key 'data.max_lenght'; did you mean 'max_length'?"),
        ({"stages": [{**E2E, "lrr": 1}]}, "unknown key 'stages.0.lrr'; did you mean 'lr'?"),
        ({"stages": [{"name": "dpo", "max_tokens": 10, "betta": 0.1}]}, "unknown key 'stages.0.betta'; did you mean 'beta'?"),
        ({"stages": [{"name": "on_policy", "max_tokens": 10, "lmbda": 2}]}, "stages.0.lmbda = 2: Input should be less than"),
        ({"data": {"answers": "teacher"}, "stages": [E2E]}, "data: answers: teacher needs max_conversations"),
        ({"stages": [{**E2E, "name": "endtoend"}]}, "'endtoend' is not a stage; did you mean 'end_to_end'?"),
        ({"stages": [{"name": "layerwise"}]}, "stages.0.max_tokens is required but missing"),
        ({"stages": []}, "stages is empty"),
        ({"stages": [{**E2E, "lr": -1}]}, "stages.0.lr = -1: Input should be greater than 0"),
        ({"stages": [{**E2E, "max_tokens": "lots"}]}, "stages.0.max_tokens = 'lots': Input should be a valid"),
        ({"student": {"attention_layers": [1], "attention_fraction": 0.5}, "stages": [E2E]},
         "set either attention_layers or attention_fraction"),
        ({"student": {"dt_min": 0.5, "dt_max": 0.1}, "stages": [E2E]}, "dt_min (0.5) must not exceed dt_max"),
        ({"student": {"mixer": "mamba1", "mamba2_d_state": 128}, "stages": [E2E]},
         "mamba2_d_state sets the Mamba-2 mixer's state; with mixer: mamba1 use mamba1_d_state"),
        ({"precision": "fp8", "stages": [E2E]}, "precision = 'fp8': Input should be 'fp32', 'bf16', 'fp16' or 'auto'"),
        ({"stages": [{"name": "sft", "max_tokens": 10, "ce_weight": 0}]}, "ce_weight and kl_weight are both 0"),
        ({"stages": [{"name": "layerwise", "max_tokens": 10, "inputs": "student"}]},
         "stages.0: inputs: student matches whole blocks' outputs; set target: block_output"),
        ({"selection": {"align": {"target": "block_output", "inputs": "student"}}, "stages": [E2E]},
         "selection.align: inputs: student has no student stack here (each layer's mixer is aligned alone"),
    ],
)
def test_mistakes_name_the_key_and_the_fix(raw, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_layer_indices_are_checked_against_the_teacher():
    recipe = recipe_from_dict({"student": {"attention_layers": [0, 29]}, "stages": [E2E]})
    recipe.check_against_teacher(30)
    with pytest.raises(RecipeError, match="layer 29 is out of range; the teacher has 4 layers, so use indices 0..3"):
        recipe.check_against_teacher(4)


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("stages:\n  - name: [end_to_end\n")
    with pytest.raises(RecipeError, match="not valid YAML at line 3"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_auto_attention_layers_take_the_fraction_and_bring_a_selection_section():
    recipe = recipe_from_dict({"stages": [dict(E2E)], "student": {"attention_layers": "auto",
                                                                 "attention_fraction": 0.25}})
    assert recipe.student.attention_layers == "auto" and recipe.student.attention_fraction == 0.25
    assert recipe.selection is not None and recipe.selection.align.max_tokens == 100_000
    assert recipe_from_dict({"stages": [dict(E2E)], "student": {"attention_layers": "auto"}}).student.attention_fraction == 0.5
    recipe.check_against_teacher(30)  # nothing to check until the layers are chosen
    with pytest.raises(RecipeError, match="student.attention_layers"):
        recipe_from_dict({"stages": [dict(E2E)], "student": {"attention_layers": "best"}})
    with pytest.raises(RecipeError, match=r"unknown key 'selection.align.objectiv'; did you mean 'objective'\?"):
        recipe_from_dict({"stages": [dict(E2E)], "selection": {"align": {"objectiv": "l2"}}})
