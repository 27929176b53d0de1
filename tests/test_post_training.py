"""Training on generations and preferences: the losses against float64 references, sampling, pseudo-labels,
preference pairs, and the on_policy, sft and dpo stages on tiny models (including kill-and-resume).

This file is also a script (`python tests/test_post_training.py SPEC_JSON`) for the SIGKILL tests.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REFERENCE_STUDENT,
    clear_greedy,
    left_padded,
    make_tiny_tokenizer,
    reordering_bound,
    tiny_llama_config,
)
from tolerances import eps, kl_error, logprob_error, summed, within

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # tiny matmuls: more threads only contend on the shared 2-core box


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny_teacher(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def tiny_student(teacher):
    from distill.init import hybrid_from_teacher
    from distill.recipe import StudentConfig

    config = StudentConfig(**REFERENCE_STUDENT, attention_fraction=0.5, chunk_size=16)
    return hybrid_from_teacher(teacher, config)


# ----------------------------------------------------------------------------- losses


def test_dpo_loss_matches_float64_formula():
    from distill.losses import dpo_loss

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 20 for _ in range(4))
    beta = 0.1
    want = [
        math.log1p(math.exp(-beta * ((a - c) - (b - d))))
        for a, b, c, d in zip(
            pc.double().tolist(), pr.double().tolist(), rc.double().tolist(), rr.double().tolist()
        )
    ]
    got = dpo_loss(pc, pr, rc, rr, beta)
    # the margin (a - c) - (b - d): three fp32 subtractions, within summed(3) of the inputs' magnitudes; the
    # loss softplus(-beta * margin) has slope at most beta, and its own few operations round it by summed(3)
    magnitude = (pc.abs() + pr.abs() + rc.abs() + rr.abs()).double()
    want = torch.tensor(want, dtype=torch.float64)
    bound = beta * summed(3) * magnitude + summed(3) * want.abs()
    within(((got.double() - want).abs() / bound).max().item(), 1.0)


def test_target_logprobs_and_their_gradient_match_float64():
    from distill.losses import target_logprobs

    g = torch.Generator().manual_seed(1)
    hidden, head = torch.randn(10, 8, generator=g, requires_grad=True), torch.randn(13, 8, generator=g)
    targets = torch.randint(0, 13, (10,), generator=g)
    got = target_logprobs(hidden, head, targets, chunk=3)
    h64 = hidden.detach().double().requires_grad_()
    want = torch.log_softmax(h64 @ head.double().T, -1)[torch.arange(10), targets]
    # fp32 logits are 8-term dot products, within summed(8) of |hidden| @ |head|; the log-softmax over 13 of
    # them adds its own rounding (tolerances.logprob_error)
    logits = h64.detach() @ head.double().T
    logit_error = summed(8) * (h64.detach().abs() @ head.double().abs().T).max().item()
    lp_error = logprob_error(logits, logit_error)
    within((got.double() - want.detach()).abs().max().item(), lp_error, "logprobs")
    got.sum().backward(), want.sum().backward()
    # d logp_t / dh = head_t - sum_v p_v head_v: each p_v within p_v * lp_error, and the 13-term sum rounds by
    # summed(13) of sum_v p_v |head_v|
    p = logits.softmax(-1)
    spread = p @ head.double().abs() + head.double().abs()[targets]
    bound = (lp_error + summed(13)) * spread
    within(((hidden.grad.double() - h64.grad).abs() / bound).max().item(), 1.0, "gradient")


@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_divergence_counts_answer_tokens_only(kind):
    """On a left-padded prompt + answer batch, the loss covers the positions predicting answer tokens, no
    more."""
    from distill.data import loss_positions
    from distill.generation import answer_labels
    from distill.losses import distill_kl

    g = torch.Generator().manual_seed(2)
    s_logits, t_logits = torch.randn(2, 9, 11, generator=g), torch.randn(2, 9, 11, generator=g)
    ids = torch.randint(0, 11, (2, 9), generator=g)
    answer = torch.zeros(2, 9, dtype=torch.long)
    answer[0, 5:] = 1
    answer[1, 6:8] = 1  # stopped early: the last slot is padding
    got = distill_kl(
        s_logits,
        t_logits,
        loss_positions(answer_labels(ids, answer)),
        kind=kind,
        jsd_beta=0.3,
        reduction="sum",
    )
    want = 0.0
    for b, t in [
        (0, 4),
        (0, 5),
        (0, 6),
        (0, 7),
        (1, 5),
        (1, 6),
    ]:  # the positions whose next token is an answer's
        p, q = torch.softmax(t_logits[b, t].double(), -1), torch.softmax(s_logits[b, t].double(), -1)
        if kind == "forward":
            want += float((p * (p / q).log()).sum())
        elif kind == "reverse":
            want += float((q * (q / p).log()).sum())
        else:
            m = 0.3 * p + 0.7 * q
            want += float(0.3 * (p * (p / m).log()).sum() + 0.7 * (q * (q / m).log()).sum())
    # six fp32 divergences, each within kl_error of its log-softmaxes' rounding, and their sum's own rounding
    log_ratio = torch.log_softmax(t_logits.double(), -1) - torch.log_softmax(s_logits.double(), -1)
    spread = log_ratio.abs().max().item()
    lp_error = max(logprob_error(s_logits), logprob_error(t_logits))
    within(abs(float(got) - want), 6 * kl_error(lp_error, spread) + summed(6) * abs(want))


def test_cross_entropy_alone_needs_no_teacher():
    from distill.data import loss_positions
    from distill.losses import distill_kl

    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(2, 6, 7, generator=g), torch.randint(0, 7, (2, 6), generator=g)
    labels[:, :2] = -100
    got = distill_kl(logits, None, loss_positions(labels), ce_weight=1.0, labels=labels, kl_weight=0.0)
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7).double(), labels[:, 1:].reshape(-1)
    )
    # the mean of fp32 log-probabilities (tolerances.logprob_error) over the loss tokens, and its own rounding
    tokens = int((labels[:, 1:] != -100).sum())
    within(abs(float(got) - float(want)), logprob_error(logits) + summed(tokens) * abs(float(want)))


# ----------------------------------------------------------------------------- prompts and sampling


def test_exchanges_are_each_documents_prompt_and_first_answer():
    from datasets import Dataset

    from distill.generation import exchanges

    row = {
        "input_ids": [[5, 6, 7, 8, 9, 1, 2, 3, 4, 0, 0]],
        "attention_mask": [[1] * 9 + [0] * 2],
        "position_ids": [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]],
        "labels": [[-100, -100, 7, 8, -100, -100, -100, -100, 4, -100, -100]],
    }
    found = exchanges(Dataset.from_dict(row), max_prompt_tokens=8)
    assert [(e.prompt, e.answer) for e in found] == [([5, 6], [7, 8]), ([1, 2, 3], [4])]
    assert [e.prompt for e in exchanges(Dataset.from_dict(row), max_prompt_tokens=2)] == [[5, 6]]


def test_greedy_sampling_of_a_left_padded_batch_equals_generate_row_by_row():
    from distill.generation import sample

    student = tiny_student(tiny_teacher())
    student.generation_config.eos_token_id = None  # run every row to max_new_tokens
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (7, 3, 5)]
    ids, _, answer = sample(student, prompts, max_new_tokens=6, temperature=0, generator=None, pad_id=0)
    for row, prompt in enumerate(prompts):
        alone = clear_greedy(student, torch.tensor([prompt]), max_new_tokens=6, pad_token_id=0)
        assert ids[row][answer[row].bool()].tolist() == alone[0, len(prompt) :].tolist(), row
    assert left_padded([torch.tensor(p) for p in prompts])[1].tolist() == (ids[:, :7] != 0).long().tolist()


def test_sampling_is_reproducible_from_the_generator_and_stops_at_eos():
    from distill.generation import sample

    student = tiny_student(tiny_teacher())
    prompts = [[3, 4, 5], [9]]
    runs = [
        sample(
            student,
            prompts,
            max_new_tokens=30,
            temperature=1.0,
            generator=torch.Generator().manual_seed(7),
            pad_id=0,
        )
        for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    other = sample(
        student,
        prompts,
        max_new_tokens=30,
        temperature=1.0,
        generator=torch.Generator().manual_seed(8),
        pad_id=0,
    )
    assert not torch.equal(runs[0][0], other[0])
    student.generation_config.eos_token_id = 17
    with torch.no_grad():  # make token 17 certain: every answer is that one token, then padding
        student.lm_head.weight[17] = 50 * student.model.norm.weight.sign()
    ids, mask, answer = sample(
        student,
        prompts,
        max_new_tokens=5,
        temperature=1.0,
        generator=torch.Generator().manual_seed(7),
        pad_id=0,
    )
    assert answer[:, 3:].tolist() == [[1, 0, 0, 0, 0]] * 2 and ids[:, 3].tolist() == [17, 17]
    assert mask[:, 4:].sum() == 0


# ----------------------------------------------------------------------------- pseudo-labels and pairs


def test_teacher_answers_are_cached_by_teacher_prompts_and_settings(cache, monkeypatch):
    from distill import generation, pseudo_labels

    teacher = tiny_teacher()
    calls = []
    original = generation.sample
    monkeypatch.setattr(generation, "sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    settings = {"max_new_tokens": 4, "temperature": 0.0, "batch_size": 2, "seed": 0, "pad_id": 0}
    first = pseudo_labels.teacher_answers(teacher, [[1, 2], [3], [4, 5, 6]], **settings)
    assert len(calls) == 2 and [len(a) for a in first] == [4, 4, 4]
    assert pseudo_labels.teacher_answers(teacher, [[1, 2], [3], [4, 5, 6]], **settings) == first
    assert len(calls) == 2  # from the cache
    pseudo_labels.teacher_answers(teacher, [[1, 2], [3], [4, 5, 6]], **{**settings, "max_new_tokens": 3})
    assert len(calls) == 4


def test_teacher_answer_rows_put_the_targets_on_the_teachers_answers(cache):
    from test_trainer import random_rows

    from distill.generation import exchanges
    from distill.pseudo_labels import teacher_answer_rows, teacher_answers
    from distill.recipe import DataConfig

    teacher = tiny_teacher()
    teacher.generation_config.eos_token_id = None  # every answer runs to answer_max_new_tokens
    train = random_rows(6, seed=1)
    cfg = DataConfig(
        max_length=48, answers="teacher", max_conversations=10, answer_max_new_tokens=5, answer_batch_size=4
    )
    rows = teacher_answer_rows(train, teacher, cfg, seed=0, pad_id=0)
    prompts = [ex.prompt for ex in exchanges(train, 48 - 5)]
    answers = teacher_answers(
        teacher, prompts, max_new_tokens=5, temperature=0.0, batch_size=4, seed=0, pad_id=0
    )
    got = exchanges(rows, 48)
    assert [(ex.prompt, ex.answer) for ex in got] == list(zip(prompts, answers))
    assert all(len(ex.answer) == 5 for ex in got)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pairs_in_trls_conversational_and_standard_formats(tmp_path):
    from distill.pairs import load_pairs

    tok = make_tiny_tokenizer()
    conversational = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "assistant", "content": "go"}],
            }
        ],
    )
    (pair,) = load_pairs(conversational, "train", tok, None)
    assert tok.decode(pair.prompt).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(pair.chosen) == "hello<|im_end|>\n" and tok.decode(pair.rejected) == "go<|im_end|>\n"
    standard = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}] * 3)
    pairs = load_pairs(standard, "train", tok, 2)
    assert len(pairs) == 2 and tok.decode(pairs[0].chosen) == "4<|im_end|>"


def test_bad_pairs_are_one_line_errors(tmp_path):
    from distill.errors import UserError
    from distill.pairs import Pair, check_vocabulary, load_pairs

    tok = make_tiny_tokenizer()
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(
        UserError, match=r"^pairs = .* has no column rejected \(it has chosen, prompt\); give "
    ):
        load_pairs(missing, "train", tok, None)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "chosen": "", "rejected": ""}])
    with pytest.raises(UserError, match=r"^pairs = .*: no usable pair"):
        load_pairs(empty, "train", tok, None)
    with pytest.raises(UserError, match=r"^pairs = .*: file not found"):
        load_pairs(str(tmp_path / "nope.json"), "train", tok, None)
    with pytest.raises(UserError, match=r"token id 300 is outside the student's vocabulary \(258\)[^\n]*$"):
        check_vocabulary([Pair([1, 2], [300], [4])], 258, "p.jsonl")


# ----------------------------------------------------------------------------- the stages


def run_stage_on_tiny(out, stage: dict, student=None, teacher=None):
    from test_trainer import make_context, make_recipe

    from distill.stages import run_stage

    teacher = teacher or tiny_teacher()
    student = student or tiny_student(teacher)
    recipe = make_recipe(out, stage)
    ctx = make_context(recipe, teacher)
    student = run_stage(ctx, 0, recipe.stages[0], student)
    summary = json.loads((Path(out) / f"stage0-{stage['name']}" / "summary.json").read_text())
    return student, summary


ON_POLICY = {
    "name": "on_policy",
    "max_tokens": 1000,
    "max_new_tokens": 10,
    "max_prompt_tokens": 20,
    "lr": 3e-3,
    "batch_size": 4,
    "held_out_rows": 8,
}
SFT = {"name": "sft", "max_tokens": 1500, "kl_weight": 0.1, "lr": 3e-3, "batch_size": 4}
DPO = {
    "name": "dpo",
    "max_tokens": 2500,
    "max_new_tokens": 10,
    "max_prompt_tokens": 20,
    "lr": 1e-3,
    "batch_size": 4,
    "max_length": 32,
    "held_out_rows": 0,
}


def test_on_policy_lowers_the_divergence_on_held_out_samples(tmp_path, cache):
    _, summary = run_stage_on_tiny(tmp_path, ON_POLICY)
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert after["loss"] < 0.7 * before["loss"], summary
    assert before["sampled"] == after["sampled"] == 1.0 and 0 < after["answer_length"] <= 10
    assert summary["tokens"] == summary["steps"] * 4 * 10  # the budget counts answer slots


def test_on_policy_lmbda_zero_trains_on_the_data_answers_only(tmp_path, cache, monkeypatch):
    from distill.stages import on_policy

    monkeypatch.setattr(on_policy, "sample", lambda *a, **k: pytest.fail("sampled with lmbda 0"))
    run_stage_on_tiny(tmp_path, {**ON_POLICY, "lmbda": 0.0, "held_out_rows": 0})
    log = [
        json.loads(line)
        for line in (tmp_path / "stage0-on_policy" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {row["sampled"] for row in log} == {0.0}


def test_sft_fits_the_training_answers(tmp_path, cache):
    """The tiny rows are random tokens (held-out cross-entropy cannot fall below ln 128): the training rows,
    seen for several epochs, are learnt."""
    _, summary = run_stage_on_tiny(tmp_path, {**SFT, "kl_weight": 0.0, "max_tokens": 6000, "lr": 1e-2})
    log = [json.loads(line) for line in (tmp_path / "stage0-sft" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(summary["held_out_before"]["loss"], rel=0.05)  # both ~ln 128
    assert summary["final_loss"] < log[0]["loss"] - 0.5, summary


def test_dpo_teacher_vs_student_raises_the_reward_margin(tmp_path, cache):
    _, summary = run_stage_on_tiny(tmp_path, DPO)
    log = [json.loads(line) for line in (tmp_path / "stage0-dpo" / "metrics.jsonl").read_text().splitlines()]
    # policy == reference at the first step: the same bits, so every margin is 0 and every pair's loss is
    # softplus(0) = log 2 (rounded to fp32, eps/2), averaged over at most `tokens` pairs (summed)
    assert log[0]["reward_margin"] == 0.0
    within(abs(log[0]["loss"] - math.log(2)), (summed(log[0]["tokens"]) + eps()) * math.log(2))
    assert log[-1]["accuracy"] > 0.8 and log[-1]["reward_margin"] > 0.5, log[-1]
    assert summary["pairs"] > 0 and summary["reference"] == "student"


def test_dpo_on_a_pairs_file_with_the_teacher_as_reference(tmp_path, cache):
    teacher = tiny_teacher()
    pairs = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5, 2], "rejected_input_ids": [6, 7, 2]}] * 8,
    )
    _, summary = run_stage_on_tiny(
        tmp_path / "run", {**DPO, "pairs": pairs, "reference": "teacher"}, teacher=teacher
    )
    assert summary["pairs"] == 8 and summary["reference"] == "teacher"


def test_pair_rows_are_as_wide_as_the_longest_pair_and_padding_changes_no_log_prob():
    from distill.pairs import Pair
    from distill.stages.dpo import answer_logprobs, pair_rows

    pairs = [Pair([1, 2, 3], [4, 5], [6, 7, 8]), Pair([9] * 7, [10, 11, 12], [13])]
    narrow = pair_rows(pairs, max_length=32, pad_id=0)
    assert (
        len(narrow[0]["input_ids"]) == 7 + 3 + 7 + 1
    )  # the longest pair: prompt + chosen, prompt + rejected
    pad = {
        "input_ids": [0] * 20,
        "attention_mask": [0] * 20,
        "position_ids": list(range(20)),
        "labels": [-100] * 20,
    }
    student = tiny_student(tiny_teacher()).double().eval()
    with torch.no_grad():
        got, wide = (
            answer_logprobs(student, {k: torch.tensor([row[k] + extra[k] for row in narrow]) for k in pad})
            for extra in (
                {k: [] for k in pad},
                pad,
            )  # as it is; padded on the right to 2 x max_length's width
        )
    # float64 sums of the same terms: only reduction orders may differ, each over at most width x hidden
    # terms, relative to the sums' size
    terms = (len(narrow[0]["input_ids"]) + 20) * student.config.hidden_size
    within((got - wide).abs().max().item(), summed(terms, torch.float64) * got.abs().max().item())
    assert got.shape == (2, 2) and (got < 0).all()


# ----------------------------------------------------------------------------- judging generations


def test_answer_nll_of_each_left_padded_row_matches_that_row_alone_in_float64():
    from distill.eval.generations import answer_nll

    teacher = tiny_teacher()
    rows = [(torch.randint(1, 128, (p,)), torch.randint(1, 128, (a,))) for p, a in ((6, 4), (2, 5), (4, 1))]
    ids, mask = left_padded([torch.cat(r) for r in rows])
    answer = torch.zeros_like(ids)
    for row, (_, ans) in enumerate(rows):
        answer[row, ids.shape[1] - len(ans) :] = 1
    nll, counts = answer_nll(teacher, ids, mask, answer)
    reference = copy_in_float64(teacher)
    for row, (prompt, ans) in enumerate(rows):
        logits = reference(torch.cat([prompt, ans])[None]).logits[0, len(prompt) - 1 : -1]
        expected = torch.nn.functional.cross_entropy(logits, ans, reduction="sum")
        assert counts[row] == len(ans)
        # fp32 logits within reordering_bound of the exact ones, each log-probability within logprob_error of
        # that, and the sum of len(ans) of them rounds by summed(len(ans)) of its size
        logit_error = reordering_bound(teacher.config, torch.float32, logits.abs().max().item())
        bound = len(ans) * logprob_error(logits, logit_error) + summed(len(ans)) * float(expected)
        within(abs(nll[row] - float(expected)), bound, f"row {row}")


def copy_in_float64(model):
    import copy

    return copy.deepcopy(model).double()


def test_generation_judge_scores_the_teacher_against_itself_as_one():
    from test_trainer import random_rows
    from transformers import LlamaForCausalLM

    from distill.eval.generations import judge_generations
    from distill.eval.report import to_markdown

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=258)).eval()
    tok = make_tiny_tokenizer()
    held_out = random_rows(6, vocab=258, seed=2)
    same = judge_generations(
        teacher, teacher, tok, held_out, prompts=5, max_new_tokens=6, batch_size=2, examples=2
    )
    assert same["prompts"] == 5 and same["greedy"]["perplexity_ratio"] == 1.0
    assert same["sampled"]["perplexity_ratio"] == 1.0  # the same seeds: the same samples
    assert same["greedy"]["shared_prefix"] == same["greedy"]["teacher_answer_length"]
    student = tiny_student(teacher)
    side = {}
    other = judge_generations(
        student, teacher, tok, held_out, prompts=5, max_new_tokens=6, batch_size=2, teacher_side=side
    )
    assert set(side) == {"teacher_greedy", "teacher_sampled"}
    greedy_only = judge_generations(
        student, teacher, tok, held_out, prompts=5, max_new_tokens=6, batch_size=2, sampled=False
    )
    assert "sampled" not in greedy_only and greedy_only["greedy"] == other["greedy"]
    side["teacher_greedy"]["nll"] = [2 * x for x in side["teacher_greedy"]["nll"]]  # proves it is read back
    again = judge_generations(
        student, teacher, tok, held_out, prompts=5, max_new_tokens=6, batch_size=2, teacher_side=side
    )
    # doubling is exact in binary floating point, in every partial sum too: the same bits, times 2
    assert again["greedy"]["teacher_nll_of_teacher"] == 2 * other["greedy"]["teacher_nll_of_teacher"]
    assert (
        again["sampled"] == other["sampled"]
        and again["per_prompt"]["student_greedy"] == other["per_prompt"]["student_greedy"]
    )
    assert (
        other["greedy"]["perplexity_ratio"] > 1.0
    )  # each greedy teacher token is its likeliest there; a random student's are not
    assert other["greedy"]["shared_prefix"] < same["greedy"]["shared_prefix"]
    report = {
        "teacher": {"perplexity": 2.0},
        "student": {"perplexity": 2.1, "kl_to_teacher": 0.1, "top1_agreement": 0.9},
        "generations": same,
    }
    text = to_markdown(report)
    assert "generation perplexity ratio (greedy, teacher-scored) | 1 | 1 |" in text
    assert text.count("**Student**") == 2


# ----------------------------------------------------------------------------- kill and resume


def launch(spec: dict, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(spec)],
        check=False,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage", [ON_POLICY, {**ON_POLICY, "lmbda": 0.5}, SFT, DPO], ids=["on_policy", "gkd_mix", "sft", "dpo"]
)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, stage):
    from safetensors.torch import load_file

    stage = {**stage, "held_out_rows": 0, "checkpoint_every_tokens": stage["max_tokens"] // 6}
    cache = str(tmp_path / "cache")
    launch({"out": str(tmp_path / "straight"), "stage": stage, "cache": cache})
    stage_dir = tmp_path / "straight" / f"stage0-{stage['name']}"
    steps = len((stage_dir / "metrics.jsonl").read_text().splitlines())
    first = next(
        row["step"]
        for row in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines())
        if row["tokens"] >= stage["checkpoint_every_tokens"]
    )
    kill_at = random.Random().randint(first + 1, steps - 1)
    killed = launch(
        {"out": str(tmp_path / "killed"), "stage": stage, "cache": cache, "kill_at_forward": kill_at},
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = launch({"out": str(tmp_path / "killed"), "stage": stage, "cache": cache})
    assert "resuming from" in resumed.stdout + resumed.stderr
    a, b = (
        load_file(next((tmp_path / run / f"stage0-{stage['name']}" / "final").glob("*.safetensors")))
        for run in ("straight", "killed")
    )
    # bit-equal: single-threaded processes on one machine, and the resumed run restores weights, optimizer,
    # scheduler and data position, and draws its samples from generators seeded by the step
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def main(spec: dict) -> None:
    """Train the tiny student for `spec`; `kill_at_forward` SIGKILLs this process in that training forward."""
    os.environ["MAMBA_DISTILL_CACHE"] = spec["cache"]
    from importlib import import_module

    name = spec["stage"]["name"]
    module, objective = {
        "on_policy": ("distill.stages.on_policy", "OnPolicyObjective"),
        "sft": ("distill.kl", "KLObjective"),  # sft trains end_to_end's objective, with its own weights
        "dpo": ("distill.stages.dpo", "DpoObjective"),
    }[name]
    cls = getattr(import_module(module), objective)
    if "kill_at_forward" in spec:
        forward, calls = cls.forward, {"n": 0}

        def dying_forward(self, batch, teacher_out):
            if torch.is_grad_enabled():  # training, not the held-out evaluation
                calls["n"] += 1
                if calls["n"] == spec["kill_at_forward"]:
                    os.kill(os.getpid(), signal.SIGKILL)
            return forward(self, batch, teacher_out)

        cls.forward = dying_forward
    run_stage_on_tiny(spec["out"], spec["stage"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
