"""Recurrent inference: the cache, decode steps against the parallel forward, generate() in all its modes."""

import pytest
import torch
from conftest import REFERENCE_STUDENT, clear_greedy, left_padded, reordering_bound
from test_model import random_model
from tolerances import half_precision_bound, within
from transformers import DynamicCache

from distill.init import hybrid_from_teacher
from distill.recipe import StudentConfig

LAYOUTS = {
    "attention": ["attention", "attention"],
    "mamba2": ["mamba2", "mamba2"],
    "mamba1": ["mamba1", "mamba1"],
    "mixed": ["attention", "mamba2", "mamba1", "mamba2"],
    "mamba-first": ["mamba2", "attention", "mamba1", "attention"],  # positions must not come from layer 0's cache
    "mamba2-wide-state": ["mamba2", "mamba2"],
}
OVERRIDES = {"mamba2-wide-state": {"mamba2_d_state": 24}}  # head_dim 16: a state 1.5 heads wide


@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_by_token_decoding_equals_the_parallel_forward(layout):
    model = random_model(LAYOUTS[layout], **OVERRIDES.get(layout, {}))
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t : t + 1], cache=cache, position_ids=torch.tensor([[t]])).logits for t in range(13)]
    # the step recurrence and the chunked scan are the same sums in another order (fp32 state in both)
    assert (torch.cat(steps, dim=1) - parallel).abs().max() <= reordering_bound(model.config, torch.float32,
                                                                                 parallel.abs().max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_then_chunk_then_steps(layout):
    """A prompt, a multi-token continuation from the cache, then single steps: all equal the parallel pass.

    No position_ids are passed: the model derives them from the cache, as generate() relies on."""
    model = random_model(LAYOUTS[layout], **OVERRIDES.get(layout, {}))
    ids = torch.randint(0, 128, (2, 14))
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        parts = [model(ids[:, :5], cache=cache).logits]
        parts.append(model(ids[:, 5:11], cache=cache).logits)
        for t in range(11, 14):
            parts.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert (torch.cat(parts, dim=1) - parallel).abs().max() <= reordering_bound(model.config, torch.float32,
                                                                                 parallel.abs().max())


@pytest.mark.parametrize("layout", ["mamba2", "mamba1"])
def test_packed_prefill_leaves_only_the_last_document_in_the_state(layout):
    model = random_model(LAYOUTS[layout])
    first, last = torch.randint(0, 128, (1, 6)), torch.randint(0, 128, (1, 2))  # last shorter than d_conv
    nxt = torch.randint(0, 128, (1, 1))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        position_ids = torch.cat([torch.arange(6), torch.arange(2)])[None]
        model(torch.cat([first, last], dim=1), cache=cache, position_ids=position_ids)
        packed = model(nxt, cache=cache, position_ids=torch.tensor([[2]])).logits
        want = model(torch.cat([last, nxt], dim=1), use_cache=False).logits[:, -1:]
    assert (packed - want).abs().max() <= reordering_bound(model.config, torch.float32, want.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decoding_keeps_the_state_in_fp32(dtype):
    model = random_model().to(dtype)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits.float()
        cache = DynamicCache(config=model.config)
        parts = [model(ids[:, :4], cache=cache).logits]
        parts += [model(ids[:, t : t + 1], cache=cache, position_ids=torch.tensor([[t]])).logits for t in range(4, 10)]
    # the same 16-bit weights; the two runs round their intermediates at different points (per token, per chunk)
    bound = half_precision_bound(model.config, dtype, parallel.abs().max().item())
    within((torch.cat(parts, dim=1).float() - parallel).abs().max().item(), bound, str(dtype))
    assert cache.layers[1].recurrent_states[0].dtype == cache.layers[2].recurrent_states[0].dtype == torch.float32


def test_decode_state_stays_constant_size():
    """Mamba layers hold a fixed conv window and SSM state; only the attention layer's KV grows."""
    model = random_model()
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    assert cache.layers[0].keys.shape[-2] == 5 + 20 - 1
    assert cache.layers[1].conv_states[0].shape == (1, 128, 4)  # 2*32 + 64 channels, d_conv
    assert cache.layers[1].recurrent_states[0].shape == (1, 4, 16, 16)  # heads, head_dim, d_state
    assert cache.layers[2].conv_states[0].shape == (1, 64, 4)
    assert cache.layers[2].recurrent_states[0].shape == (1, 4, 16, 16)
    assert cache.layers[1].recurrent_states[0].dtype == torch.float32


@pytest.mark.parametrize("layout", ["mamba2", "mamba1", "mixed"])
def test_batched_left_padded_generation_equals_unbatched(layout):
    model = random_model(LAYOUTS[layout])
    model.generation_config.pad_token_id = 0
    prompts = [torch.randint(1, 128, (n,)) for n in (7, 3, 5)]
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for row, prompt in enumerate(prompts):
            alone = clear_greedy(model, prompt[None], max_new_tokens=8)
            assert torch.equal(batched[row, width:], alone[0, len(prompt) :]), row


@pytest.mark.parametrize("layout", ["mamba2", "mamba1", "mixed"])
def test_cached_generation_equals_uncached(layout):
    model = random_model(LAYOUTS[layout])
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        greedy = clear_greedy(model, ids, max_new_tokens=10)
        assert torch.equal(greedy, model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False))
        torch.manual_seed(3)
        sampled = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, temperature=1.5)
        torch.manual_seed(3)
        again = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, temperature=1.5, use_cache=False)
    assert torch.equal(sampled, again)
    assert not torch.equal(sampled, greedy)


@pytest.mark.slow
def test_smollm2_zero_mamba_student_is_the_teacher(smollm2):
    teacher, tokenizer = smollm2
    student = hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, attention_fraction=1.0)).eval()
    ids = tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = teacher(**ids).logits
        diff = (student(**ids).logits - want).abs().max().item()
    # the teacher's own attention, MLP and norm weights in the hybrid's layers: the same sums, maybe in another
    # order (reordering_bound)
    assert diff <= reordering_bound(teacher.config, torch.float32, want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg",
    [
        StudentConfig(**REFERENCE_STUDENT, mixer="mamba2", attention_fraction=0.5),
        StudentConfig(**REFERENCE_STUDENT, mixer="mamba1", attention_fraction=0.5),
        StudentConfig(**REFERENCE_STUDENT, mixer="mamba2", attention_fraction=0.0),
    ],
    ids=["mamba2-50", "mamba1-50", "mamba2-0"],
)
def test_smollm2_students_generate(smollm2, cfg, capsys):
    teacher, tokenizer = smollm2
    student = hybrid_from_teacher(teacher, cfg).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = student.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        alone = student.generate(**tokenizer(["Hi"], return_tensors="pt"), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 8)
    assert torch.equal(out[1, -8:], alone[0, -8:])
    with capsys.disabled():
        print(f"\n{student.config.mixer_types.count('attention')} attention layers, "
              f"{student.num_parameters() / 1e6:.2f}M parameters: {tokenizer.decode(out[0, -8:])!r}")
