"""lm-eval's stock `hf` model on a saved tiny checkpoint gives our own forward pass's log-likelihoods."""

import pytest
import torch
from conftest import REFERENCE_STUDENT, reordering_bound, tiny_llama_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tolerances import within
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

EOS = 256


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte plus <eos>: no merges, so context/continuation splits are unambiguous."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)} | {"<eos>": EOS}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


def save_tiny_checkpoint(path, seed: int = 0):
    """A tiny random Llama with the byte tokenizer, saved as a HF folder; returns (model, tokenizer)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(
        vocab_size=EOS + 1,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=None,
        max_position_embeddings=4096,
    )
    model, tokenizer = LlamaForCausalLM(config).eval(), byte_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def _loglikelihood(model, tokens: list[int], first_scored: int) -> tuple[float, float]:
    """Sum of log p(tokens[t] | tokens[:t]) for t >= first_scored, in float64, and how far an fp32 run may be
    from it: each scored log-probability within twice reordering_bound of the largest logit (log-softmax), and
    the sum within the number of scored tokens times that."""
    logits = model.double()(torch.tensor([tokens])).logits[0]
    logp = torch.log_softmax(logits, -1)
    total = sum(logp[t - 1, tokens[t]].item() for t in range(first_scored, len(tokens)))
    per_token = 2 * reordering_bound(model.config, torch.float32, logits.abs().max().item())
    return total, (len(tokens) - first_scored) * per_token


def _native_hybrid(tmp_path):
    """The tiny Llama turned into a 50% hybrid and saved as a run's final/ folder (with its remote code)."""
    from distill.init import hybrid_from_teacher
    from distill.pipeline import save_final
    from distill.recipe import StudentConfig

    teacher, tokenizer = save_tiny_checkpoint(tmp_path / "teacher")
    student = hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, attention_fraction=0.5), seed=0).eval()
    save_final(student, tokenizer, tmp_path / "tiny")
    return student, tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "native_hybrid"])
def test_lm_eval_loglikelihoods_match_our_forward(tmp_path, monkeypatch, kind):
    from distill.eval.lm_eval_runner import run_lm_eval, summarize

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if kind == "llama":
        model, tokenizer = save_tiny_checkpoint(tmp_path / "tiny")
    else:
        model, tokenizer = _native_hybrid(tmp_path)
    out = run_lm_eval(
        tmp_path / "tiny", ["sharegpt_next_sentence", "sharegpt_ppl"], limit=3, batch_size=2, log_samples=True
    )
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids

    checked = 0
    for sample in out["samples"]["sharegpt_next_sentence"]:
        for (context, continuation), [(lm_eval_ll, _)] in zip(sample["arguments"], sample["resps"]):
            context_ids = encode(context)
            ours, bound = _loglikelihood(model, context_ids + encode(continuation), len(context_ids))
            # lm-eval's fp32 forward, batched and padded, vs ours in float64, alone (see _loglikelihood)
            within(abs(lm_eval_ll - ours), bound, "continuation")
            checked += 1
    for sample in out["samples"]["sharegpt_ppl"]:
        (text,) = sample["arguments"][0]
        ours, bound = _loglikelihood(model, [EOS] + encode(text), 1)  # lm-eval scores the first token after <eos>
        within(abs(sample["resps"][0][0] - ours), bound, "text")  # as above, summed over the text
        checked += 1
    assert checked == 3 * 4 + 3

    metrics = summarize(out["results"])
    assert 0.0 <= metrics["sharegpt_next_sentence"]["acc"] <= 1.0
    assert metrics["sharegpt_ppl"]["byte_perplexity"] > 1.0


@pytest.mark.slow  # lm-eval indexes its few thousand task YAMLs first
def test_unknown_task_and_missing_folder_are_one_line(tmp_path):
    from distill.eval.lm_eval_runner import run_lm_eval

    with pytest.raises(ValueError, match="'no_such_task' could not be loaded offline") as err:
        run_lm_eval(tmp_path / "nope", ["no_such_task"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        run_lm_eval(tmp_path / "nope", ["sharegpt_ppl"])
    with pytest.raises(ValueError, match="no lm-eval tasks"):
        run_lm_eval(tmp_path / "nope", [])


def test_shipped_task_data_is_well_formed():
    import json
    import os

    from distill.eval.lm_eval_runner import LOCAL_TASKS, TASKS_DIR, _task_spec

    assert {"sharegpt_ppl", "sharegpt_next_sentence"} <= set(LOCAL_TASKS)
    rows = [
        json.loads(line) for line in (TASKS_DIR / "sharegpt_next_sentence.jsonl").read_text().splitlines()
    ]
    assert len(rows) >= 100
    assert all(len(row["choices"]) == 4 and 0 <= row["label"] < 4 for row in rows)
    labels = [row["label"] for row in rows]
    assert max(labels.count(k) for k in range(4)) < 0.4 * len(rows)  # the answer position is shuffled
    spec = _task_spec("sharegpt_ppl")
    assert all(os.path.isabs(path) for path in spec["dataset_kwargs"]["data_files"].values())
