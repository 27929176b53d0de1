"""Shared fixtures: a tiny random Llama for fast tests, the real SmolLM2 teacher for the slow ones."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without CUDA, Triton kernels only run in its interpreter, which must be chosen before triton is first imported
# (`import distill` imports it through transformers); tests/test_kernels_triton.py relies on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "attn_implementation": "sdpa",
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def reordering_bound(config, dtype: torch.dtype, scale: float) -> float:
    """How far two correct runs of one model may differ when only the order of their sums differs.

    Another thread count, process, kernel or mask layout sums the same products in another order. A sum of n
    products rounds differently by up to about n * eps of the sum of their magnitudes, which for these random
    models is a few times the result's magnitude (`scale`, e.g. max |logits|); the errors of the layers add up.
    The factor 2 covers that sum-of-magnitudes ratio (about sqrt(n) / 4 at n = 128 in practice).
    """
    longest = max(config.hidden_size, config.intermediate_size)
    return 2 * config.num_hidden_layers * longest * torch.finfo(dtype).eps * scale


def clear_greedy(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Greedy `generate`, asserting that every pick wins by more than twice `reordering_bound`.

    Then any other correct computation of the same logits (batched, padded, uncached, another thread count) must
    pick the same tokens, so comparing token ids is sound on any CPU; a near tie fails here, not there.
    """
    out = model.generate(input_ids, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)
    logits = torch.stack(out.logits).float()
    top2 = logits.topk(2, dim=-1).values
    bound = reordering_bound(model.config, torch.float32, logits.abs().max())
    assert (top2[..., 0] - top2[..., 1]).min() > 2 * bound, "a near tie between greedy picks: use another seed"
    return out.sequences


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch: (input_ids with 0 as padding, attention_mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@pytest.fixture
def tiny_llama():
    """A seeded tiny random LlamaForCausalLM in fp32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_tokenizer(merges: list[tuple[str, str]] = ()):
    """A byte-level tokenizer (256 bytes, then one token per BPE merge, then <|im_start|> and <|im_end|>) with
    SmolLM2's ChatML template; without merges <|im_start|> is 256 and <|im_end|> 257.

    Pair it with `tiny_llama_config(vocab_size=258 + len(merges))`. Fast, offline, and has offsets like the real
    one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {a + b: len(vocab) + i for i, (a, b) in enumerate(merges)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture
def one_thread():
    """Tiny models run thousands of small matmuls; on a loaded machine extra threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty $MAMBA_DISTILL_CACHE for tests that write assets or data caches."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MAMBA_DISTILL_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct teacher (fetched and converted once), as (model, tokenizer)."""
    from distill.recipe import TeacherConfig
    from distill.teacher import load_teacher

    model, tokenizer = load_teacher(TeacherConfig(), dtype=torch.float32)
    return model.eval(), tokenizer


# The reference's student: evenly spaced attention layers, norm weights at one and a random conv. The library's
# defaults (layers chosen from data, the calibrated norm) need training rows; tests that build a student
# directly pin these.
REFERENCE_INIT = {"norm_init": "ones", "conv_init": "random"}
REFERENCE_STUDENT = {**REFERENCE_INIT, "attention_layers": "uniform"}
