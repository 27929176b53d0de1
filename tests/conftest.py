"""Shared fixtures: a tiny random Llama for fast tests, the real SmolLM2 teacher for the slow ones."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


@pytest.fixture
def tiny_llama():
    """A seeded tiny random LlamaForCausalLM in fp32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct teacher (fetched and converted once), as (model, tokenizer)."""
    from distill.recipe import TeacherConfig
    from distill.teacher import load_teacher

    model, tokenizer = load_teacher(TeacherConfig(), dtype=torch.float32)
    return model.eval(), tokenizer
