"""An exported student trains in TRL's SFTTrainer and DPOTrainer, for users who align with TRL (dev extra)."""

import math

import pytest
import torch
from conftest import REFERENCE_STUDENT, make_tiny_tokenizer, reordering_bound, tiny_llama_config
from tolerances import eps, logit_scale, logprob_error, summed, within

pytest.importorskip("trl", reason="TRL is in the dev extra: pip install -e '.[dev]'")

MESSAGES = [
    [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} {i}"}] for i in range(8)
]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"what is {i}+1?"}],
        "chosen": [{"role": "assistant", "content": str(i + 1)}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    for i in range(8)
]


@pytest.fixture
def exported(tmp_path):
    """A tiny hybrid student exported in the native format (remote code included), loaded back as users do."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from distill.export import export
    from distill.init import hybrid_from_teacher
    from distill.recipe import StudentConfig

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=258))
    config = StudentConfig(**{**REFERENCE_STUDENT, "attention_layers": [1], "chunk_size": 16})
    student = hybrid_from_teacher(teacher, config)
    student.save_pretrained(tmp_path / "final")
    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "final")
    export(tmp_path / "final", "native", tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True)
    return model, tokenizer


def changed(model, before: dict) -> bool:
    return any(
        not torch.equal(before[name], p.detach()) for name, p in model.named_parameters() if ".mamba." in name
    )


def train_three_steps(model, tokenizer, trainer_cls, config_cls, rows: list[dict], out, **settings):
    """Three logged steps of a TRL trainer on `rows`; returns its config and the (finite) losses."""
    from datasets import Dataset

    args = config_cls(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        **settings,
    )
    trainer = trainer_cls(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    return args, losses


@pytest.mark.slow
def test_exported_student_trains_in_trls_sft_trainer(exported, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = exported
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_three_steps(model, tokenizer, SFTTrainer, SFTConfig, [{"messages": m} for m in MESSAGES],
                      tmp_path / "sft", max_length=64)
    assert changed(model, before)


@pytest.mark.slow
def test_exported_student_trains_in_trls_dpo_trainer(exported, tmp_path):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = exported
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args, losses = train_three_steps(
        model, tokenizer, DPOTrainer, DPOConfig, PAIRS, tmp_path / "dpo", beta=0.1
    )
    # policy == reference at the first step (TRL's reference is a copy, run on the same batch): each margin
    # (a - b) - (c - d) of answer log-probability sums is 0 up to their reordering, each of at most `longest`
    # tokens within logprob_error (logits bounded from the weights); the loss softplus(-beta * margin) has
    # slope beta / 2 there, and log 2 itself rounds to fp32 (eps/2) and is averaged over the batch (summed)
    conversations = [p["prompt"] + p[side] for p in PAIRS for side in ("chosen", "rejected")]
    longest = max(len(tokenizer.apply_chat_template(c, return_dict=True)["input_ids"]) for c in conversations)
    scale = logit_scale(model)
    token_error = logprob_error(torch.full((model.config.vocab_size,), scale),
                                reordering_bound(model.config, torch.float32, scale))
    averaging = (summed(args.per_device_train_batch_size) + eps()) * math.log(2)
    bound = args.beta / 2 * 4 * longest * token_error + averaging
    within(abs(losses[0] - math.log(2)), bound)
    assert changed(model, before)
