"""Distillation losses: KL-type divergences between next-token distributions, and hidden-state alignment.

Everything is computed in fp32 and averaged per loss token. `distill_kl` never materialises the full
(B, L, V) logits: it keeps only the loss positions, and walks over them in chunks of `chunk` tokens,
projecting hidden states through `lm_head` inside the chunk. The chunk's gradient (w.r.t. the hidden
states and the head weight) is computed right there in the forward pass, so backward only scales stored
gradients and nothing is recomputed; peak memory is one chunk of logits per model.

Top-k cached teacher logits (`TopK`) keep the teacher's k most likely tokens per position as log-probs at
the loss temperature. The rest of the vocabulary (the "tail") becomes one extra outcome whose teacher
probability is 1 - sum(top-k); the student's probabilities are pooled the same way. The loss is then the
exact divergence between the two distributions coarsened to k + 1 outcomes: a lower bound on the
full-vocabulary divergence (data-processing inequality) that only ignores how the student spreads its tail
mass among tail tokens. Unlike renormalising the top-k, it does not push the student's tail mass to zero.
"""

from __future__ import annotations

import math
from typing import NamedTuple, get_args

import torch
import torch.nn.functional as F

from distill.recipe import AlignmentObjective, Divergence

KINDS = get_args(Divergence)


class TopK(NamedTuple):
    """The teacher's top-k next-token log-probs (at the loss temperature) and their token ids."""

    logprobs: torch.Tensor  # (..., k) float
    indices: torch.Tensor  # (..., k) int64


def divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str, beta: float = 0.5):
    """Per-row divergence between two distributions given as log-probs over the same outcomes (last dim).

    forward: KL(teacher || student); reverse: KL(student || teacher); jsd: the generalised Jensen-Shannon
    divergence beta * KL(t || m) + (1 - beta) * KL(s || m) with m = beta * t + (1 - beta) * s.
    """

    def kl(logp, logq):  # sum p (log p - log q), with 0 log 0 = 0
        p = logp.exp()
        return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)

    if kind == "forward":
        return kl(teacher_logp, student_logp)
    if kind == "reverse":
        return kl(student_logp, teacher_logp)
    if kind == "jsd":
        mix = torch.logsumexp(
            torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0
        )
        return beta * kl(teacher_logp, mix) + (1 - beta) * kl(student_logp, mix)
    raise ValueError(f"kl = {kind!r} is not a divergence; use one of {', '.join(KINDS)}")


# Tail log-probs are floored at log(1e-30): fp32 rounding in 1 - sum(top-k) can leave the teacher a tail
# of ~1e-7 where the student's is exactly empty, which would otherwise make the divergence infinite.
TAIL_FLOOR = math.log(1e-30)


def _pool_tail(logp_full: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probs -> (k + 1) log-probs: the k given tokens, then everything else pooled."""
    top = logp_full.gather(-1, indices)
    tail = torch.logsumexp(logp_full.scatter(-1, indices, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([top, tail.clamp(min=TAIL_FLOOR)], dim=-1)


def topk_with_tail(topk: TopK) -> torch.Tensor:
    """Teacher top-k log-probs -> (k + 1) log-probs with the tail mass 1 - sum(top-k) as the last outcome."""
    logp = topk.logprobs.float()
    tail = torch.log1p(-logp.exp().sum(-1, keepdim=True).clamp(max=1.0)).clamp(min=TAIL_FLOOR)
    return torch.cat([logp, tail], dim=-1)


class _Spec(NamedTuple):
    kind: str
    temperature: float
    beta: float
    ce_weight: float
    chunk: int
    kl_weight: float


def _chunk_loss(student_logits, teacher, targets, spec: _Spec) -> torch.Tensor:
    """Summed loss of one chunk of loss positions; `teacher` is logits (N, V), a TopK of (N, k), or None
    (cross-entropy only)."""
    t = spec.temperature
    student_logits = student_logits.float()
    loss = torch.zeros((), device=student_logits.device)
    if teacher is not None:
        student_logp = F.log_softmax(student_logits / t, dim=-1)
        if isinstance(teacher, TopK):
            teacher_logp = topk_with_tail(teacher)
            student_logp = _pool_tail(student_logp, teacher.indices)
        else:
            teacher_logp = F.log_softmax(teacher.float() / t, dim=-1)
        # Scaling by T^2 keeps the gradient's magnitude independent of the temperature (Hinton et al., 2015).
        loss = spec.kl_weight * divergence(teacher_logp, student_logp, spec.kind, spec.beta).sum() * t * t
    if spec.ce_weight:
        loss = loss + spec.ce_weight * F.cross_entropy(student_logits, targets, reduction="sum")
    return loss


class _ChunkedDistill(torch.autograd.Function):
    """Sum of `_chunk_loss` over chunks of rows, with each chunk's gradient computed eagerly in forward."""

    @staticmethod
    def forward(ctx, student, student_weight, teacher, teacher_weight, targets, spec):
        want_x = ctx.needs_input_grad[0]
        want_w = student_weight is not None and ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(student) if want_x else None
        grad_w = torch.zeros_like(student_weight, dtype=torch.float32) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], spec.chunk):
            rows = slice(start, start + spec.chunk)
            with torch.no_grad():
                if teacher is None:
                    teacher_chunk = None
                elif isinstance(teacher, TopK):
                    teacher_chunk = TopK(teacher.logprobs[rows], teacher.indices[rows])
                elif teacher_weight is not None:
                    teacher_chunk = teacher[rows] @ teacher_weight.T
                else:
                    teacher_chunk = teacher[rows]
            with torch.enable_grad():
                x = student[rows].detach().requires_grad_(want_x)
                w = student_weight.detach().requires_grad_(want_w) if student_weight is not None else None
                logits = x @ w.T if w is not None else x
                loss = _chunk_loss(logits, teacher_chunk, targets[rows] if targets is not None else None, spec)
            inputs = [v for v, want in ((x, want_x), (w, want_w)) if want]
            grads = list(torch.autograd.grad(loss, inputs)) if inputs else []
            if want_x:
                grad_x[rows] = grads.pop(0)
            if want_w:
                grad_w += grads.pop(0)
            total += loss.detach()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = student_weight.dtype if student_weight is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        grad_x = grad_x * grad_out if grad_x is not None else None
        grad_w = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None, None


def distill_kl(
    student: torch.Tensor,
    teacher: torch.Tensor | TopK,
    mask: torch.Tensor,
    *,
    student_head: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    kind: str = "forward",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    ce_weight: float = 0.0,
    labels: torch.Tensor | None = None,
    chunk: int = 1024,
    reduction: str = "mean",
    kl_weight: float = 1.0,
) -> torch.Tensor:
    """Divergence between teacher and student next-token distributions at the `mask` positions.

    student: (B, L, H) hidden states when `student_head` (the lm_head weight, (V, H)) is given, else (B, L, V)
    logits. teacher: likewise with `teacher_head`, or a `TopK` of (B, L, k) cached log-probs. mask: (B, L)
    bool, usually `loss_positions(labels)`. `ce_weight` adds cross-entropy on the next token (from the
    unshifted `labels`) at temperature 1 to `kl_weight` times the divergence; with `kl_weight` 0 the teacher
    may be None (cross-entropy alone). reduction "mean" divides by the number of loss positions, "sum" lets
    the caller normalise over several micro-batches.
    """
    if kind not in KINDS:
        raise ValueError(f"kl = {kind!r} is not a divergence; use one of {', '.join(KINDS)}")
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels; pass labels=batch['labels']")
    mask = mask.bool()
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)[mask] if labels is not None else None
    if teacher is None and kl_weight:
        raise ValueError("kl_weight > 0 needs the teacher; pass kl_weight=0 for cross-entropy alone")
    if teacher is None or not kl_weight:
        teacher_rows = None
    elif isinstance(teacher, TopK):
        teacher_rows = TopK(teacher.logprobs[mask], teacher.indices[mask].long())
    else:
        teacher_rows = teacher[mask]
    spec = _Spec(kind, float(temperature), float(jsd_beta), float(ce_weight), int(chunk), float(kl_weight))
    total = _ChunkedDistill.apply(student[mask], student_head, teacher_rows, teacher_head, targets, spec)
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)


ALIGNMENT_OBJECTIVES = get_args(AlignmentObjective)


def alignment_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, objective: str = "mse", reduction="mean"
) -> torch.Tensor:
    """Per-token alignment error between hidden states, in fp32, summed or averaged over `mask` tokens.

    - `mse`: the mean over channels of the squared error;
    - `token_normalized_mse`: that divided by the target token's mean square;
    - `layer_normalized_mse`: that divided by the target's mean square over the batch's tokens (a constant
      per layer and batch), so layers whose outputs have very different scales weigh alike;
    - `l2`: the L2 norm of the error (not squared; MOHAWK's and RADLADS' choice), so tokens with large errors
      weigh less than under the squared error.
    """
    if objective not in ALIGNMENT_OBJECTIVES:
        raise ValueError(f"alignment objective {objective!r}: use one of {', '.join(ALIGNMENT_OBJECTIVES)}")
    mask = mask.bool()
    pred, target = pred[mask].float(), target[mask].float()
    error = pred - target
    if objective == "l2":
        per_token = error.pow(2).sum(-1).sqrt()
    else:
        per_token = error.pow(2).mean(-1)
    if objective == "token_normalized_mse":
        per_token = per_token / target.pow(2).mean(-1).clamp(min=1e-6)
    elif objective == "layer_normalized_mse":
        per_token = per_token / target.pow(2).mean().clamp(min=1e-6)
    total = per_token.sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)


def target_logprobs(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, chunk: int = 1024):
    """log softmax(hidden @ head.T)[targets] per row of `hidden` (N, H), in fp32, `chunk` rows of logits at a
    time; each chunk is recomputed in backward (activation checkpointing), so no (N, V) logits are kept."""
    from torch.utils.checkpoint import checkpoint

    def one(h, w, t):
        return F.log_softmax((h @ w.T).float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)

    parts = [checkpoint(one, hidden[s : s + chunk], head, targets[s : s + chunk], use_reentrant=False)
             for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair sigmoid DPO loss (Rafailov et al., 2023) from summed answer log-probs:
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))). Computed in fp32."""
    margin = (policy_chosen.float() - reference_chosen.float()) - (policy_rejected.float() - reference_rejected.float())
    return -F.logsigmoid(beta * margin)
