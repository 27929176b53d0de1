"""Speculative decoding through stock `generate`: lossless greedy in every role, exact rollback, exact
sampling."""

import pytest
import torch
from conftest import REFERENCE_INIT, REFERENCE_STUDENT, clear_greedy, reordering_bound, tiny_llama_config
from scipy.stats import chi2
from test_model import random_model
from transformers import DynamicCache, LlamaForCausalLM

from distill.init import hybrid_from_teacher
from distill.recipe import StudentConfig

# Mamba layers at the first and the last index, attention between
EDGES = {
    "mamba2": ["mamba2", "attention", "mamba2", "mamba2"],
    "mamba1": ["mamba1", "attention", "mamba2", "mamba1"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def crops(monkeypatch):
    """Every `crop` that generate asks of a cache: the number of tokens each one removed."""
    removed = []
    original = DynamicCache.crop

    def spy(self, tokens_to_remove):
        removed.append(-tokens_to_remove)
        return original(self, tokens_to_remove)

    monkeypatch.setattr(DynamicCache, "crop", spy)
    return removed


def teacher_and_student(mixer: str, seed: int = 0):
    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval()  # 0.02 repeats one token
    student = hybrid_from_teacher(
        teacher, StudentConfig(**REFERENCE_INIT, mixer=mixer, attention_layers=[1, 2]), seed=seed
    ).eval()
    return teacher, student


def assert_lossless(target, ids, crops, max_new_tokens=24, **assist):
    """Assisted greedy == plain greedy (whose picks all clear the reordering bound), with drafts rejected."""
    with torch.no_grad():
        plain = clear_greedy(target, ids, max_new_tokens=max_new_tokens)
        crops.clear()
        assisted = target.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, **assist)
    assert torch.equal(assisted, plain), (assisted, plain)
    assert any(removed > 0 for removed in crops), "no draft was rejected: the rollback was not exercised"


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_teacher_with_a_hybrid_draft(mixer, crops):
    teacher, student = teacher_and_student(mixer)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    assert_lossless(teacher, ids, crops, assistant_model=student)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_hybrid_with_the_teacher_as_draft(mixer, crops):
    teacher, student = teacher_and_student(mixer)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    assert_lossless(student, ids, crops, assistant_model=teacher)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_hybrid_with_a_smaller_hybrid_draft(mixer, crops):
    target = random_model(EDGES[mixer], seed=2)
    draft = random_model(["attention", mixer], seed=3)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    assert_lossless(target, ids, crops, assistant_model=draft, num_assistant_tokens=3)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_hybrid_with_a_near_copy_of_itself_as_draft(mixer, crops):
    """A draft that agrees often: long accepted runs, partial rejections and the growing draft length."""
    target = random_model(EDGES[mixer], seed=2)
    draft = random_model(EDGES[mixer], seed=2)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05 * parameter.std().nan_to_num(0))
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    assert_lossless(target, ids, crops, max_new_tokens=40, assistant_model=draft)
    drafted = [removed for removed in crops if removed > 0]
    assert len(drafted) < len(crops), "every round rejected something: the accepted path was not exercised"


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_hybrid_with_prompt_lookup(mixer, crops):
    target = random_model(EDGES[mixer], seed=5)
    phrase = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    ids = torch.cat([phrase, phrase, phrase[:, :3]], dim=1)  # a prompt the lookup can copy from
    assert_lossless(target, ids, crops, prompt_lookup_num_tokens=4)


def test_bamba_export_with_prompt_lookup_and_a_hybrid_draft(crops):
    from transformers import BambaForCausalLM

    from distill.export import bamba_config, bamba_state_dict

    native = random_model(EDGES["mamba2"], seed=7, mamba_norm_eps=1e-5)
    bamba = BambaForCausalLM(bamba_config(native.config)).eval()
    bamba.load_state_dict(bamba_state_dict(native.config, native.state_dict()), strict=False)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(
            clear_greedy(native, ids, max_new_tokens=16),
            bamba.generate(ids, do_sample=False, max_new_tokens=16),
        )
    assert_lossless(bamba, ids, crops, prompt_lookup_num_tokens=3)
    assert_lossless(bamba, ids, crops, assistant_model=random_model(["mamba2", "attention"], seed=9))


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1", "mamba2-wide-state"])
@pytest.mark.parametrize("rejected", [0, 1, 3, 5])
def test_forward_then_crop_equals_the_kept_prefix_alone(mixer, rejected):
    """Forward 5 drafted tokens after a prompt, crop r: the cache and the next logits are the prefix's own.

    Both sides are correct computations of the same sums in another order (a chunked scan and a batched
    state sum against steps or a longer scan), so they agree to `reordering_bound` at the tensors' scale.
    """
    wide = mixer == "mamba2-wide-state"  # head_dim 16, d_state 24: the recorded states are hd x n
    overrides = {"mamba2_d_state": 24} if wide else {}
    model = random_model(EDGES["mamba2" if wide else mixer], seed=10, **overrides)
    ids = torch.randint(0, 128, (1, 17), generator=torch.Generator().manual_seed(11))
    prompt, draft, kept = ids[:, :11], ids[:, 11:16], 11 + 5 - rejected
    with torch.no_grad():
        recorded = DynamicCache(config=model.config)
        recorded.activate_past_recording(recurrent_states_to_keep=5)
        model(prompt, cache=recorded)
        model(draft, cache=recorded)
        recorded.crop(-rejected)
        alone = DynamicCache(config=model.config)
        model(ids[:, :kept], cache=alone)
        for i, (got, expected) in enumerate(zip(recorded.layers, alone.layers, strict=True)):
            if model.config.mixer_types[i] == "attention":
                pairs = [(got.keys, expected.keys), (got.values, expected.values)]
            else:
                pairs = [
                    (got.conv_states[0], expected.conv_states[0]),
                    (got.recurrent_states[0], expected.recurrent_states[0]),
                ]
            for a, b in pairs:
                assert a.shape == b.shape, (i, a.shape, b.shape)
                bound = reordering_bound(model.config, torch.float32, b.abs().max())
                assert (a - b).abs().max() <= bound, i
        nxt = ids[:, kept : kept + 1]
        got, expected = model(nxt, cache=recorded).logits, model(nxt, cache=alone).logits
    assert (got - expected).abs().max() <= reordering_bound(model.config, torch.float32, expected.abs().max())


def chi2_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-squared goodness of fit; cells expecting fewer than 5 samples are pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    statistic = ((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum().item()
    return float(chi2.sf(statistic, len(observed) - 1))


def sequence_probabilities(model, prompt: torch.Tensor, vocab: int) -> torch.Tensor:
    """The exact probability of each of the vocab**2 two-token continuations (one batched forward)."""
    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
    first = model(prompt).logits[0, -1].softmax(-1)
    second = model(torch.cat([prompt.expand(len(pairs), -1), pairs[:, :1]], dim=1)).logits[:, -1].softmax(-1)
    return first[pairs[:, 0]] * second[torch.arange(len(pairs)), pairs[:, 1]]


def sampled_frequencies(model, prompt: torch.Tensor, vocab: int, samples: int, **kwargs) -> torch.Tensor:
    torch.manual_seed(14)
    counts = torch.zeros(vocab * vocab)
    for _ in range(samples):
        new = model.generate(prompt, do_sample=True, max_new_tokens=2, top_k=0, **kwargs)[
            0, prompt.shape[1] :
        ]
        counts[new[0] * vocab + new[1]] += 1
    return counts


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_assisted_sampling_draws_from_the_target_distribution(mixer):
    """Two sampled tokens over a 4-token vocabulary: the 16 sequences' frequencies under assisted sampling (a
    different hybrid drafts) against the target's exact probabilities, Pearson's chi-squared at level 1e-3.

    A correct sampler fails at that level for one seed in a thousand; the seeds are fixed, so the test is
    deterministic. It has the power to matter: the same samples fail it against the draft's distribution.
    """
    vocab, samples, alpha = 4, 300, 1e-3
    target = random_model(EDGES[mixer], seed=12, vocab_size=vocab)
    draft = random_model(["attention", mixer], seed=13, vocab_size=vocab)
    with torch.no_grad():
        draft.model.norm.weight.mul_(4)  # a peaked draft, far from the near-uniform target: many rejections
    for model in (target, draft):
        model.generation_config.eos_token_id = None  # every token is a token: exactly two are sampled
    prompt = torch.tensor([[1, 2, 3, 0, 1]])
    with torch.no_grad():
        exact = sequence_probabilities(target, prompt, vocab)
        proposed = sequence_probabilities(draft, prompt, vocab)
        assisted = sampled_frequencies(
            target, prompt, vocab, samples, assistant_model=draft, num_assistant_tokens=2
        )
    assert chi2_p_value(assisted, exact) > alpha
    assert chi2_p_value(assisted, proposed) < alpha, "the test cannot tell the draft from the target"


def agree_until_a_near_tie(target, ids, max_new_tokens, **assist) -> int:
    """Assisted greedy equals plain greedy up to the plain run's first pick that does not clear twice
    `reordering_bound` (after it, another summation order may pick the other token). Returns that length."""
    with torch.no_grad():
        plain = target.generate(
            ids,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assisted = target.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, **assist)
    logits = torch.stack(plain.logits).float()[:, 0]
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * reordering_bound(target.config, torch.float32, logits.abs().max())
    length = int(clear.long().cumprod(0).sum())  # picks up to and including the last clear one in a row
    assert torch.equal(assisted[0, : ids.shape[1] + length], plain.sequences[0, : ids.shape[1] + length])
    return length


@pytest.mark.slow
def test_smollm2_speculative_roles_are_lossless(smollm2, crops):
    """The real teacher and a 50% Mamba-2 student built from it (untrained), in the three roles. Real logits
    have near ties within the conservative reordering bound, so the runs must agree up to the first one."""
    teacher, tokenizer = smollm2
    student = hybrid_from_teacher(
        teacher, StudentConfig(**REFERENCE_STUDENT, attention_fraction=0.5), seed=0
    ).eval()
    counting = tokenizer("1, 2, 3, 4, 5,", return_tensors="pt").input_ids
    france = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert agree_until_a_near_tie(teacher, counting, 16, assistant_model=student) >= 8
    assert agree_until_a_near_tie(student, france, 16, prompt_lookup_num_tokens=4) >= 2
    assert agree_until_a_near_tie(student, france, 16, assistant_model=teacher) >= 2
    assert any(removed > 0 for removed in crops)


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_sdpa_gqa_attention_computes_what_sdpa_does(mixer, crops):
    """`sdpa_gqa` (distill/attention.py) folds the query heads onto the 2 key/value heads where sdpa copies
    them: a left-padded prefill and a 5-token verification over its cache give sdpa's logits (within the
    reordering bound: another kernel may sum in another order), and prompt lookup under it stays lossless."""
    from conftest import left_padded

    import distill.attention  # noqa: F401  (registers sdpa_gqa)

    model = random_model(EDGES[mixer], seed=5)
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    generator = torch.Generator().manual_seed(7)
    ids, mask = left_padded([torch.randint(0, 128, (n,), generator=generator) for n in (9, 6)])
    drafts = torch.randint(0, 128, (2, 5), generator=generator)
    verify_mask = torch.cat([mask, torch.ones_like(drafts)], 1)
    logits = {}
    with torch.no_grad():
        for implementation in ("sdpa", "sdpa_gqa"):
            model.set_attn_implementation(implementation)
            cache = DynamicCache(config=model.config)
            prefill = model(ids, attention_mask=mask, cache=cache).logits
            verify = model(drafts, attention_mask=verify_mask, cache=cache).logits
            logits[implementation] = torch.cat([prefill[mask.bool()], verify.flatten(0, 1)])  # no padding
    bound = reordering_bound(model.config, torch.float32, logits["sdpa"].abs().max())
    assert (logits["sdpa_gqa"] - logits["sdpa"]).abs().max() <= bound
    phrase = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    ids = torch.cat([phrase, phrase, phrase[:, :3]], dim=1)  # a prompt the lookup can copy from
    assert_lossless(model, ids, crops, prompt_lookup_num_tokens=4)


def test_sdpa_gqa_refuses_what_only_sdpa_computes():
    from distill.attention import sdpa_gqa_attention_forward

    q, kv = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap.*attn_implementation='sdpa'"):
        sdpa_gqa_attention_forward(torch.nn.Module(), q, kv, kv, None, softcap=30.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [True, False])
def test_sdpa_gqa_one_query_in_reduced_precision_against_float64(dtype, masked, monkeypatch):
    """A decode step's single bf16/fp16 query goes through `one_query_attention` (fp32 products, query heads
    folded onto their key/value head) and gives float64 attention of the same rounded inputs, in sdpa's
    layout. Bound: a score sums d products, so in fp32 it is off by up to d * eps(fp32) * S, S = d * max|q| *
    max|k| * scale bounding the products' magnitudes; that moves each softmax weight by up to twice as much,
    relatively; the weighted sum of L values (and the softmax's own rounding) adds (L + 4) * eps(fp32); all
    times max|v|. The final rounding to `dtype` adds eps(dtype) / 2 of the output's magnitude."""
    from distill import attention

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, keys, head_dim = 2, 6, 2, 40, 16
    query = torch.randn(batch, heads, 1, head_dim, generator=generator).to(dtype)
    key, value = (
        torch.randn(batch, kv_heads, keys, head_dim, generator=generator).to(dtype) for _ in range(2)
    )
    mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., :7] = False  # the second sequence is left-padded by 7
    original, calls = attention.one_query_attention, []
    monkeypatch.setattr(attention, "one_query_attention", lambda *args: calls.append(1) or original(*args))
    output, _ = attention.sdpa_gqa_attention_forward(
        torch.nn.Module(), query, key, value, mask if masked else None, scaling=0.3
    )
    assert calls and output.dtype == dtype and output.shape == (batch, 1, heads, head_dim)
    groups = heads // kv_heads  # query head j * groups + i reads key/value head j
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (key, value))
    scores = query.double() @ k.transpose(-1, -2) * 0.3
    if masked:
        scores = scores.masked_fill(~mask, float("-inf"))
    reference = (scores.softmax(-1) @ v).transpose(1, 2)
    eps = torch.finfo(torch.float32).eps
    products = head_dim * query.double().abs().max() * key.double().abs().max() * 0.3
    bound = (2 * head_dim * eps * products + (keys + 4) * eps) * value.double().abs().max()
    bound = bound + torch.finfo(dtype).eps / 2 * reference.abs()
    assert ((output.double() - reference).abs() <= bound).all()
