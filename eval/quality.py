"""Teacher vs student on held-out rows: perplexity, KL(teacher||student) and top-1 agreement in one pass.

Both models read the same rows (same tokenization, same packing). Only the final hidden states are kept
per batch; the vocabulary projection, log-softmax and the metrics run in fp32 over chunks of loss
positions, so memory is bounded by `chunk_tokens x vocab` whatever the row length. Sums are accumulated
in float64 and divided once at the end, so the result does not depend on the batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.errors import UserError


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _final_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states (after the final norm). No attention mask: transformers then derives the
    block-diagonal causal mask from `position_ids` (packed rows); right padding cannot reach real tokens."""
    device = _device(model)
    out = model.get_decoder()(
        input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False
    )
    return out.last_hidden_state


def _head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight.float(), None if head.bias is None else head.bias.float()


@torch.no_grad()
def compare_on_held_out(
    student, teacher, held_out, *, max_sequences: int = 64, batch_size: int = 4, chunk_tokens: int = 1024
) -> dict:
    """Score `student` against `teacher` on the first `max_sequences` rows of `held_out` (batch format).

    Returns `{"teacher": {"perplexity", "nll"}, "student": {"perplexity", "nll", "kl_to_teacher",
    "top1_agreement"}, "tokens": n}`; every mean is per loss token (labels != -100, scored at t + 1).
    """
    if len(held_out) == 0:
        raise UserError("the held-out set is empty; raise data.held_out_size or pass --data with more rows")
    rows = held_out.select(range(min(max_sequences, len(held_out)))).with_format("torch")
    t_weight, t_bias = _head(teacher)
    s_weight, s_bias = _head(student)
    if t_weight.shape[0] != s_weight.shape[0]:
        raise UserError(
            f"teacher and student vocabularies differ ({t_weight.shape[0]} vs {s_weight.shape[0]}); "
            "compare a student with the teacher it was distilled from"
        )
    totals = torch.zeros(4, dtype=torch.float64)  # teacher nll, student nll, kl, agreements
    tokens = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        if not keep.any():
            continue
        t_hidden = _final_hidden(teacher, batch["input_ids"], batch["position_ids"])[:, :-1][
            keep.to(t_weight.device)
        ]
        s_hidden = _final_hidden(student, batch["input_ids"], batch["position_ids"])[:, :-1][
            keep.to(s_weight.device)
        ]
        targets = targets[keep]
        for i in range(0, targets.numel(), chunk_tokens):
            target = targets[i : i + chunk_tokens].to(t_weight.device)
            t_logp = F.log_softmax(F.linear(t_hidden[i : i + chunk_tokens].float(), t_weight, t_bias), dim=-1)
            s_logits = F.linear(s_hidden[i : i + chunk_tokens].float(), s_weight, s_bias)
            s_logp = F.log_softmax(s_logits.to(t_logp.device), dim=-1)
            per_token = torch.stack(
                [
                    -t_logp.gather(-1, target[:, None])[:, 0],
                    -s_logp.gather(-1, target[:, None])[:, 0],
                    (t_logp.exp() * (t_logp - s_logp)).sum(-1),
                    (t_logp.argmax(-1) == s_logp.argmax(-1)).float(),
                ]
            )
            totals += per_token.double().sum(-1).cpu()
        tokens += targets.numel()
    if tokens == 0:
        raise UserError("the held-out rows have no loss tokens (all labels are -100); check data.loss_on")
    t_nll, s_nll, kl, agree = (totals / tokens).tolist()
    return {
        "teacher": {"perplexity": math.exp(t_nll), "nll": t_nll},
        "student": {
            "perplexity": math.exp(s_nll),
            "nll": s_nll,
            "kl_to_teacher": kl,
            "top1_agreement": agree,
        },
        "tokens": tokens,
        "sequences": len(rows),
    }
