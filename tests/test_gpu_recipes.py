"""The GPU recipes (recipes/<model>/*.yaml), each checked against its teacher's config.

The hub is unreachable here, so each teacher's config.json is written from its public values
(recipes/teachers.json, which scripts/check_gpu_recipes.py also builds its random teachers from); that they are
the published model is checked by its parameter count. A recipe must name its teacher, fit its layer count,
build a student whose copied weights all exist in the teacher with the same shapes, carry the family's
features over, list the Bamba export exactly when Bamba can express the student, and name an accelerate
config that exists.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.errors import UserError
from distill.export import bamba_config
from distill.init import hybrid_config_from_teacher
from distill.modeling_hybrid import HybridForCausalLM
from distill.recipe import load_recipe
from distill.teacher import teacher_config, teacher_num_layers

ROOT = Path(__file__).parents[1]
# each teacher's hub id, published parameter count (model card, billions) and public config.json values
TEACHERS = json.loads((ROOT / "recipes" / "teachers.json").read_text())
PUBLIC = {name: teacher["config"] for name, teacher in TEACHERS.items()}
PARAMS = {name: teacher["published_billions"] for name, teacher in TEACHERS.items()}
HUB = {name: teacher["hub"] for name, teacher in TEACHERS.items()}
RECIPES = sorted(path for folder in PUBLIC for path in (ROOT / "recipes" / folder).glob("*.yaml"))


def test_every_teacher_has_recipes():
    assert {path.parent.name for path in RECIPES} == set(PUBLIC)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_gpu_recipe_fits_its_teacher(tmp_path, path):
    model = path.parent.name
    public = PUBLIC[model]
    (tmp_path / "config.json").write_text(json.dumps(public))
    assert load_recipe(path).teacher.source == HUB[model]
    recipe = load_recipe(path, [f"teacher.source={tmp_path}"])

    assert teacher_num_layers(recipe.teacher) == public["num_hidden_layers"]
    recipe.check_against_teacher(public["num_hidden_layers"])
    config = teacher_config(recipe.teacher)
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in teacher.parameters()) / 1e9
    assert abs(billions - PARAMS[model]) <= 0.02 * PARAMS[model], billions  # model cards round to 2-3 digits

    student_cfg = recipe.student
    if student_cfg.attention_layers == "auto":  # chosen on data at run time: check the same count, placed
        student_cfg = student_cfg.model_copy(update={"attention_layers": None})
    hybrid = hybrid_config_from_teacher(config, student_cfg)
    with torch.device("meta"):
        student = HybridForCausalLM(hybrid)
    shapes = {name: tensor.shape for name, tensor in teacher.state_dict().items()}
    for name, param in student.named_parameters():  # what hybrid_from_teacher copies from the teacher
        if ".mamba." not in name:
            assert shapes[name] == param.shape, name
    fraction = student_cfg.attention_fraction
    assert hybrid.mixer_types.count("attention") == round(fraction * public["num_hidden_layers"])
    assert hybrid.teacher_model_type == public["model_type"]
    assert hybrid.rope_parameters == config.rope_parameters  # e.g. Llama 3.x's llama3 scaling
    assert hybrid.tie_word_embeddings == public["tie_word_embeddings"]
    assert hybrid.mamba_bc_norm == (public["model_type"] == "qwen3")
    assert hybrid.mamba_proj_bias == (public["model_type"] == "qwen2")

    try:
        bamba_config(hybrid)
        expressible = True
    except UserError:
        expressible = False
    assert ("bamba" in recipe.export.formats) == expressible

    launch = re.search(r"--config_file (\S+)", path.read_text())
    assert launch and (ROOT / launch.group(1)).is_file()


# Each GPU recipe run on CPU at its teacher's real width and sequence length (scripts/check_gpu_recipes.py):
# minutes and up to ~14 GB each, so only when asked for, e.g. DISTILL_GPU_RECIPES=2 (the layers to keep).
REAL_SHAPES = os.environ.get("DISTILL_GPU_RECIPES")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_SHAPES, reason="opt-in: DISTILL_GPU_RECIPES=<layers> runs each recipe at real width")
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_gpu_recipe_runs_at_real_shapes(tmp_path, path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "scripts" / "check_gpu_recipes.py"), str(path),
               "--layers", REAL_SHAPES, "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    [run] = json.loads(out.read_text())
    recipe = load_recipe(path)
    phases = [phase["phase"] for phase in run["phases"]]
    expected = [f"stage {i}: {stage.name}" for i, stage in enumerate(recipe.stages)]
    expected += ["eval"] + [f"export {fmt}" for fmt in recipe.export.formats]
    assert [p for p in phases if p != "selection"] == expected
    assert ("selection" in phases) == (recipe.student.attention_layers == "auto")
