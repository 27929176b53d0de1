"""Held-out quality metrics against a naive float64 loop that runs every packed document on its own."""

import copy
import math

import pytest
import torch
from conftest import reordering_bound, tiny_llama_config
from datasets import Dataset
from tolerances import kl_error, within
from transformers import LlamaForCausalLM

from distill.eval.quality import compare_on_held_out

ROW = 24


def _packed_rows(vocab: int = 128) -> tuple[Dataset, list[list[tuple[int, int]]]]:
    """Three rows in the batch format: packed documents, a prompt span without loss, right padding."""
    g = torch.Generator().manual_seed(1)
    layouts = [[10, 14], [16], [5, 7, 12]]  # document lengths per row; row 1 is padded to ROW
    rows = {"input_ids": [], "attention_mask": [], "position_ids": [], "labels": []}
    spans = []
    for docs in layouts:
        ids = torch.randint(3, vocab, (ROW,), generator=g)
        positions, labels, mask, row_spans, start = [], [], [], [], 0
        for length in docs:
            positions += list(range(length))
            doc_labels = ids[start : start + length].tolist()
            doc_labels[0] = -100  # first token of every packed document is never a target
            if length > 8:
                doc_labels[1:3] = [-100, -100]  # a short "prompt" without loss
            labels += doc_labels
            mask += [1] * length
            row_spans.append((start, start + length))
            start += length
        pad = ROW - start
        positions += list(range(pad))
        labels += [-100] * pad
        mask += [0] * pad
        ids[start:] = 0
        rows["input_ids"].append(ids.tolist())
        rows["attention_mask"].append(mask)
        rows["position_ids"].append(positions)
        rows["labels"].append(labels)
        spans.append(row_spans)
    return Dataset.from_dict(rows), spans


def _reference(student, teacher, data: Dataset, spans) -> dict:
    """Float64, one document at a time, one position at a time."""
    student, teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    t_nll = s_nll = kl = agree = scale = spread = 0.0
    n = 0
    margins = []  # per position, the smaller of the two models' top-2 logit gaps
    for row, row_spans in zip(data, spans):
        for start, end in row_spans:
            ids = torch.tensor(row["input_ids"][start:end])[None]
            t_logits = teacher(ids).logits[0]
            s_logits = student(ids).logits[0]
            for t in range(end - start - 1):
                target = row["labels"][start + t + 1]
                if target == -100:
                    continue
                p = torch.softmax(t_logits[t], -1)
                log_p, log_q = torch.log_softmax(t_logits[t], -1), torch.log_softmax(s_logits[t], -1)
                scale = max(scale, t_logits[t].abs().max().item(), s_logits[t].abs().max().item())
                spread = max(spread, (log_p - log_q).abs().max().item())
                t_nll -= log_p[target].item()
                s_nll -= log_q[target].item()
                kl += sum(p[v].item() * (log_p[v].item() - log_q[v].item()) for v in range(p.numel()))
                agree += float(t_logits[t].argmax() == s_logits[t].argmax())
                margins.append(min(float(-torch.diff(x[t].topk(2).values)) for x in (t_logits, s_logits)))
                n += 1
    return {
        "t_ppl": math.exp(t_nll / n),
        "s_ppl": math.exp(s_nll / n),
        "kl": kl / n,
        "agree": agree / n,
        "margins": margins,
        "n": n,
        "scale": scale,  # the largest |logit|: what fp32 rounding of the forwards is relative to
        "spread": spread,  # max |log p - log q|: the KL's conditioning (tolerances.kl_error)
    }


@pytest.fixture
def student():
    torch.manual_seed(1)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def test_matches_float64_reference_per_document(tiny_llama, student):
    data, spans = _packed_rows()
    got = compare_on_held_out(student, tiny_llama, data, batch_size=2, chunk_tokens=7)
    ref = _reference(student, tiny_llama, data, spans)
    assert got["tokens"] == ref["n"]
    # fp32 forwards, chunked and batched, vs float64 ones: every logit within reordering_bound; each token's NLL
    # is a log-probability, so within twice that, and so is their mean; the perplexity, its exp, within expm1 of
    # that, relative. The KL moves by at most kl_error of that log-probability error.
    logit_error = reordering_bound(tiny_llama.config, torch.float32, ref["scale"])
    for model, key in (("teacher", "t_ppl"), ("student", "s_ppl")):
        within(abs(got[model]["perplexity"] / ref[key] - 1), math.expm1(2 * logit_error), f"{model} perplexity")
    within(abs(got["student"]["kl_to_teacher"] - ref["kl"]), kl_error(2 * logit_error, ref["spread"]), "kl")
    # An argmax can flip only where a model's top two logits are within twice the logit error of each other.
    near_ties = sum(m <= 2 * logit_error for m in ref["margins"])
    # (+1e-12: the two count ratios' own rounding)
    within(abs(got["student"]["top1_agreement"] - ref["agree"]), near_ties / ref["n"] + 1e-12, "agreement")
    assert 0 < got["student"]["top1_agreement"] < 1  # two random models: the check can fail either way


def test_teacher_against_itself(tiny_llama):
    data, _ = _packed_rows()
    got = compare_on_held_out(tiny_llama, tiny_llama, data)
    # the same model on the same batches: the same logits bit for bit, so every KL term p (log p - log q) is 0
    assert got["student"]["kl_to_teacher"] == 0
    assert got["student"]["top1_agreement"] == 1.0
    assert got["student"]["perplexity"] == got["teacher"]["perplexity"]


def test_independent_of_batch_size_and_chunking(tiny_llama, student):
    data, _ = _packed_rows()
    a = compare_on_held_out(student, tiny_llama, data, batch_size=1, chunk_tokens=1)
    b = compare_on_held_out(student, tiny_llama, data, batch_size=3, chunk_tokens=4096)
    # other chunkings and batch sizes: the same forwards in another order, every logit within reordering_bound
    # (see test_matches_float64_reference_per_document for the perplexity and KL bounds that follow from it)
    ref = _reference(student, tiny_llama, data, _packed_rows()[1])
    logit_error = reordering_bound(tiny_llama.config, torch.float32, ref["scale"])
    kl_bound = kl_error(2 * logit_error, ref["spread"])
    within(abs(a["student"]["kl_to_teacher"] - b["student"]["kl_to_teacher"]), kl_bound)
    within(abs(a["teacher"]["perplexity"] / b["teacher"]["perplexity"] - 1), math.expm1(2 * logit_error))


def test_max_sequences_limits_rows(tiny_llama):
    data, _ = _packed_rows()
    assert compare_on_held_out(tiny_llama, tiny_llama, data, max_sequences=1)["sequences"] == 1


def test_user_mistakes_are_one_line(tiny_llama):
    data, _ = _packed_rows()
    no_loss = data.map(lambda row: {"labels": [-100] * ROW})
    with pytest.raises(ValueError, match="no loss tokens"):
        compare_on_held_out(tiny_llama, tiny_llama, no_loss)
    torch.manual_seed(0)
    other_vocab = LlamaForCausalLM(tiny_llama_config(vocab_size=64)).eval()
    with pytest.raises(ValueError, match="vocabularies differ"):
        compare_on_held_out(other_vocab, tiny_llama, data)
