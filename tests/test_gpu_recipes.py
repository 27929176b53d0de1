"""The GPU recipes (recipes/<model>/*.yaml), each checked against its teacher's config.

The hub is unreachable here, so each teacher's config.json is written from its public values; that they are
the published model is checked by its parameter count. A recipe must name its teacher, fit its layer count,
build a student whose copied weights all exist in the teacher with the same shapes, carry the family's
features over, list the Bamba export exactly when Bamba can express the student, and name an accelerate
config that exists.
"""

import json
import re
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
LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
PUBLIC = {
    "llama-3.2-1b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16,
        "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True, "vocab_size": 128256, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    "llama-3.2-3b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 3072,
        "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8, "num_hidden_layers": 28,
        "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True, "vocab_size": 128256, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    "llama-3.1-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}, "tie_word_embeddings": False, "vocab_size": 128256,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu"},
    "qwen2.5-0.5b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24,
        "max_position_embeddings": 32768, "max_window_layers": 21, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True, "vocab_size": 151936,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu"},
    "qwen2.5-1.5b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
        "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2, "num_hidden_layers": 28,
        "max_position_embeddings": 32768, "max_window_layers": 21, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True, "vocab_size": 151936,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu"},
    "qwen3-0.6b": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
        "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 8, "num_hidden_layers": 28,
        "head_dim": 128, "max_position_embeddings": 40960, "max_window_layers": 28, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "sliding_window": None, "use_sliding_window": False, "attention_bias": False,
        "tie_word_embeddings": True, "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
        "hidden_act": "silu"},
    "qwen3-1.7b": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
        "intermediate_size": 6144, "num_attention_heads": 16, "num_key_value_heads": 8, "num_hidden_layers": 28,
        "head_dim": 128, "max_position_embeddings": 40960, "max_window_layers": 28, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "sliding_window": None, "use_sliding_window": False, "attention_bias": False,
        "tie_word_embeddings": True, "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
        "hidden_act": "silu"},
    "smollm3-3b": {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_size": 2048,
        "intermediate_size": 11008, "num_attention_heads": 16, "num_key_value_heads": 4, "num_hidden_layers": 36,
        "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "rope_theta": 5000000.0,
        "no_rope_layer_interval": 4, "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)],
        "use_sliding_window": False, "sliding_window": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True, "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128012,
        "pad_token_id": 128004, "hidden_act": "silu"},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 32768, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu"},
}
# published parameter counts (model cards), in billions
PARAMS = {"llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.1-8b": 8.03, "qwen2.5-0.5b": 0.49,
          "qwen2.5-1.5b": 1.54, "qwen3-0.6b": 0.6, "qwen3-1.7b": 1.7, "smollm3-3b": 3.08, "mistral-7b": 7.25}
HUB = {"llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
       "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
       "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct", "qwen3-0.6b": "Qwen/Qwen3-0.6B", "qwen3-1.7b": "Qwen/Qwen3-1.7B",
       "smollm3-3b": "HuggingFaceTB/SmolLM3-3B", "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3"}
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
