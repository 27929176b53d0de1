"""Numeric bounds for the tests, derived from the dtype's unit roundoff, the size of the computation and
its conditioning (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3), and a check that records
how close each measured error comes to its bound.

- A sum or dot product of n terms computed in floating point is off by at most n * eps times the sum of the
  terms' magnitudes (gamma_n, to first order); summed in another order, two results differ by at most twice
  that. `summed` gives the relative factor.
- log_softmax(x)_i = x_i - logsumexp(x): moving every logit by at most d moves each log-probability by at
  most 2d.
- A computation that runs the same operations on the same inputs in the same order gives the same bits; those
  tests compare exactly (torch.equal), which is also the only sound check for resume and determinism.

`conftest.reordering_bound` is the same reasoning for a whole model's forward pass.
"""

import math
import os

import torch
from conftest import reordering_bound


def eps(dtype: torch.dtype = torch.float32) -> float:
    """The dtype's unit roundoff (machine epsilon): the relative spacing of its numbers near 1."""
    return torch.finfo(dtype).eps


def summed(n: int, dtype: torch.dtype = torch.float32) -> float:
    """The relative error bound of an n-term sum against exact arithmetic: n * eps (gamma_n to first order),
    relative to the sum of the terms' magnitudes, which equals the sum's own when the terms share a sign."""
    return n * eps(dtype)


def within(err: float, bound: float, what: str = "") -> None:
    """assert err <= bound, recording err / bound for a stress run (DISTILL_TOLERANCE_LOG names the file)."""
    log = os.environ.get("DISTILL_TOLERANCE_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("[")[0]
        with open(log, "a") as f:
            f.write(f"{test}{':' + what if what else ''}\t{err / bound:.4g}\n")
    assert err <= bound, f"{what} error {err:.3g} > bound {bound:.3g}"


def logprob_error(logits: torch.Tensor, logit_error: float = 0.0) -> float:
    """How far an fp32 log_softmax(logits) over the last dimension may be from the exact one: twice the error
    already in the logits (x_i - logsumexp(x) moves by at most |dx_i| + max |dx|), plus the rounding of the
    V-term logsumexp, relative to the largest |logit| plus log V (its result's size)."""
    vocab = logits.shape[-1]
    return 2 * logit_error + summed(vocab) * (logits.abs().max().item() + math.log(vocab))


def kl_error(logprob_error: float, spread: float) -> float:
    """How far KL(p || q) = sum_v p_v (log p_v - log q_v), or a mean of such terms, may move when every
    log-probability of either distribution moves by at most d = `logprob_error`: each p_v moves by at most
    p_v * d (to first order), so the sum moves by at most d * (2 + spread), with spread = max_v |log p_v -
    log q_v| (the divergence's conditioning)."""
    return logprob_error * (2 + spread)


def kl_reordering_error(student, teacher, s_logits, t_logits) -> float:
    """How far two fp32 runs of the mean KL between these models' logits may differ when they sum in
    another order (batching, packing, chunking): each run's logits within reordering_bound, its
    log-probabilities within logprob_error of that, the KL within kl_error of those; two runs, twice that."""
    spread = (torch.log_softmax(t_logits.double(), -1) - torch.log_softmax(s_logits.double(), -1)).abs().max()
    lp = max(logprob_error(logits, reordering_bound(model.config, torch.float32, logits.abs().max().item()))
             for model, logits in ((student, s_logits), (teacher, t_logits)))
    return 2 * kl_error(lp, spread.item())


def half_precision_bound(config, dtype: torch.dtype, scale: float, ops_per_layer: int = 20) -> float:
    """How far a model's outputs (of magnitude `scale`) in a 16-bit dtype may be from its fp32 outputs, or two
    16-bit runs that round at different points (a cached decode against the parallel pass) from each other.

    CPU matmuls and reductions accumulate in fp32 and round their result once, so the error is not a sum's
    n * eps (reordering_bound, which for bf16 exceeds the outputs themselves) but one rounding of at most
    eps/2 of its value for every stored tensor: about `ops_per_layer` per layer plus the final norm and the
    head, and as many again (the 16-bit weights of every product, or the other run's roundings). These reach
    the outputs with gain about 1 (normalised activations, weights of RMS about 1 / sqrt(width)) and with
    independent signs, so they add as a random walk: a rounding error uniform in +-eps/2 has standard
    deviation eps / (2 sqrt 3), N of them sqrt(N) times that, and 6 standard deviations cover the largest of
    a few thousand outputs (a 1e-9 tail each)."""
    roundings = 2 * (ops_per_layer * config.num_hidden_layers + 2)
    return 6 * math.sqrt(roundings) * eps(dtype) / (2 * math.sqrt(3)) * scale


def adam_error(weight: torch.Tensor, *, steps: int, lr: float, betas: tuple[float, float], grad_error: float):
    """How far each weight of two AdamW runs may end apart after `steps` steps of at most `lr` when every
    gradient of one run is within a relative `grad_error` of the other's (the same sums in another order).

    Adam's step lr * m / sqrt(v) divides each gradient by its running RMS: m and sqrt(v) each move by
    grad_error, and by as much again through the clipping norm (a factor common to one step's gradients,
    which Adam divides out within a step but not across steps), so the step moves by at most
    4 * grad_error * lr * max |m / sqrt(v)|, and that maximum over the EMA weights a_i of m and b_i of v is
    sqrt(sum a_i^2 / b_i) (Cauchy-Schwarz; 1.01 after 7 steps at betas (0.9, 0.98)). Each run also rounds the
    weight at every step, eps/2 of |w| each. Holds where no gradient cancels to below grad_error of the
    magnitudes of its terms, as reordering_bound assumes for the forward."""
    b1, b2 = betas
    a = [(1 - b1) * b1 ** (steps - i) / (1 - b1**steps) for i in range(1, steps + 1)]
    b = [(1 - b2) * b2 ** (steps - i) / (1 - b2**steps) for i in range(1, steps + 1)]
    largest_step = max(1.0, math.sqrt(sum(x * x / y for x, y in zip(a, b))))
    return steps * (4 * grad_error * lr * largest_step + eps() * weight.abs())


def logit_scale(model) -> float:
    """An upper bound on |logits| from the weights alone: the final RMSNorm's output has norm sqrt(hidden)
    times its largest gain at most, and each logit is its dot product with one row of the head
    (Cauchy-Schwarz)."""
    gain = model.model.norm.weight.abs().max().item()
    return math.sqrt(model.config.hidden_size) * gain * model.lm_head.weight.norm(dim=-1).max().item()
