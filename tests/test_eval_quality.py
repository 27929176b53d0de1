"""Held-out quality metrics against a naive float64 loop that runs every packed document on its own."""

import copy
import math

import pytest
import torch
from conftest import tiny_llama_config
from datasets import Dataset
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
    t_nll = s_nll = kl = agree = 0.0
    n = 0
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
                t_nll -= log_p[target].item()
                s_nll -= log_q[target].item()
                kl += sum(p[v].item() * (log_p[v].item() - log_q[v].item()) for v in range(p.numel()))
                agree += float(t_logits[t].argmax() == s_logits[t].argmax())
                n += 1
    return {
        "t_ppl": math.exp(t_nll / n),
        "s_ppl": math.exp(s_nll / n),
        "kl": kl / n,
        "agree": agree / n,
        "n": n,
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
    # fp32, chunked and batched, vs a float64 reference: the mean NLL is off by a few eps32 (1e-7) and the
    # perplexity, its exp, by as much relative; KL is a mean of differences of near-equal logs, so 10x looser
    assert got["teacher"]["perplexity"] == pytest.approx(ref["t_ppl"], rel=1e-5)
    assert got["student"]["perplexity"] == pytest.approx(ref["s_ppl"], rel=1e-5)
    assert got["student"]["kl_to_teacher"] == pytest.approx(ref["kl"], rel=1e-4)
    assert got["student"]["top1_agreement"] == pytest.approx(ref["agree"])
    assert 0 < got["student"]["top1_agreement"] < 1  # two random models: the check can fail either way


def test_teacher_against_itself(tiny_llama):
    data, _ = _packed_rows()
    got = compare_on_held_out(tiny_llama, tiny_llama, data)
    assert abs(got["student"]["kl_to_teacher"]) < 1e-6  # the same model twice: every KL term is exactly 0
    assert got["student"]["top1_agreement"] == 1.0
    assert got["student"]["perplexity"] == pytest.approx(got["teacher"]["perplexity"], rel=1e-6)


def test_independent_of_batch_size_and_chunking(tiny_llama, student):
    data, _ = _packed_rows()
    a = compare_on_held_out(student, tiny_llama, data, batch_size=1, chunk_tokens=1)
    b = compare_on_held_out(student, tiny_llama, data, batch_size=3, chunk_tokens=4096)
    # other chunkings and batch sizes: the same sums in another order (see test_matches_float64_reference_per_document)
    assert a["student"]["kl_to_teacher"] == pytest.approx(b["student"]["kl_to_teacher"], rel=1e-5)
    assert a["teacher"]["perplexity"] == pytest.approx(b["teacher"]["perplexity"], rel=1e-6)


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
