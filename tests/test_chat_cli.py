"""`distill generate` / `distill chat`: streamed answers, speculative flags, one-line refusals."""

import io

import pytest
from conftest import make_tiny_tokenizer
from test_model import random_model

from distill.chat import acceptance
from distill.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def save(tmp_path, name, layout, seed, tokenizer=None):
    folder = tmp_path / name
    random_model(layout, seed=seed, vocab_size=258).save_pretrained(folder)
    (tokenizer or make_tiny_tokenizer()).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def checkpoints(tmp_path):
    return (
        save(tmp_path, "target", ["mamba2", "attention", "mamba1"], seed=0),
        save(tmp_path, "draft", ["attention", "mamba2"], seed=1),
    )


def answer(capsys, argv):
    assert main(argv) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_generate_is_the_same_answer_plain_and_speculative(checkpoints, capsys):
    target, draft = checkpoints
    base = ["generate", target, "--prompt", "hello hello hello", "--max-new-tokens", "12"]
    plain, stats = answer(capsys, base)
    assert "tokens/s" in stats and "accepted" not in stats
    for extra in (["--prompt-lookup", "3"], ["--draft", draft]):
        out, stats = answer(capsys, base + extra)
        assert out == plain
        assert "tokens/s" in stats and "drafted tokens" in stats, stats


def test_on_cpu_the_supported_families_attend_with_sdpa_gqa(checkpoints, tmp_path):
    """`sdpa_gqa` verifies drafts without repeat_kv (test_speculative: it computes sdpa's logits); a model of
    another family keeps transformers' default, which may rely on what sdpa_gqa refuses."""
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel

    from distill.chat import load_model

    assert load_model(Path(checkpoints[0]), "float32", "cpu").config._attn_implementation == "sdpa_gqa"
    other = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=258)).save_pretrained(other)
    assert load_model(other, "float32", "cpu").config._attn_implementation == "sdpa"


def test_chat_keeps_the_conversation(checkpoints, capsys, monkeypatch):
    target, _ = checkpoints
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand again\n\n"))
    out, stats = answer(capsys, ["chat", target, "--max-new-tokens", "4", "--prompt-lookup", "2"])
    assert out.count("> ") == 3 and "tokens/s" in stats


def test_mistakes_are_one_line(checkpoints, tmp_path, capsys):
    target, _ = checkpoints
    other = make_tiny_tokenizer()
    other.add_tokens(["<|extra|>"])
    foreign = save(tmp_path, "foreign", ["attention", "mamba2"], seed=2, tokenizer=other)
    capsys.readouterr()
    cases = [
        (["generate", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        (["generate", target, "--prompt", "x", "--draft", foreign], "another tokenizer"),
        (["generate", target, "--prompt", "x", "--prompt-lookup", "0"], "--prompt-lookup 0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and err.count("\n") == 0 and message in err, err


def test_acceptance_counts_from_forward_lengths():
    # prompt 5 + 3 drafted (2 accepted + 1 own), then 1 + 3 drafted (3 accepted + 1 own), then 1 + 0 (1 own)
    assert acceptance([8, 4, 1], prompt_len=5, new_tokens=8) == (6, 5)
