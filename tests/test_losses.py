"""The distillation losses against direct float64 references, token by token."""

import math

import pytest
import torch
from tolerances import kl_error, logprob_error, summed, within

from distill.data import loss_positions
from distill.losses import ALIGNMENT_OBJECTIVES, KINDS, TopK, alignment_loss, distill_kl

B, L, H, V = 2, 7, 8, 11


def reference(t_logits, s_logits, labels, kind, temperature, beta=0.5, ce_weight=0.0):
    """A naive loop over positions in float64: the mean over loss tokens of the divergence (times T^2)."""
    total, count = 0.0, 0
    for b in range(t_logits.shape[0]):
        for i in range(t_logits.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            pt = torch.softmax(t_logits[b, i].double() / temperature, -1)
            ps = torch.softmax(s_logits[b, i].double() / temperature, -1)
            if kind == "forward":
                div = sum(pt[v] * math.log(pt[v] / ps[v]) for v in range(len(pt)))
            elif kind == "reverse":
                div = sum(ps[v] * math.log(ps[v] / pt[v]) for v in range(len(pt)))
            else:
                m = beta * pt + (1 - beta) * ps
                div = sum(beta * pt[v] * math.log(pt[v] / m[v]) + (1 - beta) * ps[v] * math.log(ps[v] / m[v])
                          for v in range(len(pt)))
            loss = div * temperature**2
            if ce_weight:
                loss = loss - ce_weight * torch.log_softmax(s_logits[b, i].double(), -1)[labels[b, i + 1]]
            total, count = total + loss, count + 1
    return total / count


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(B, L, H, generator=g)
    t_hidden = torch.randn(B, L, H, generator=g)
    s_head = torch.randn(V, H, generator=g)
    t_head = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return s_hidden, t_hidden, s_head, t_head, labels


def logit_error(*pairs) -> float:
    """fp32 logits hidden @ head.T are H-term dot products: within summed(H) of |hidden| @ |head|.T."""
    return max(summed(H) * (hidden.abs() @ head.abs().T).max().item() for hidden, head in pairs)


def divergence_error(t_logits, s_logits, temperature, logits_error=0.0, ce_weight=0.0) -> float:
    """How far an fp32 mean divergence (times T^2, plus ce_weight * CE) may be from the float64 one: each
    log-softmax of logits / T within logprob_error, the divergence within kl_error of that (its spread taken
    from the float64 log-probabilities), the CE term within the student's log-probability error."""
    t, s = t_logits.double() / temperature, s_logits.double() / temperature
    lp = max(logprob_error(t, logits_error / temperature), logprob_error(s, logits_error / temperature))
    spread = (torch.log_softmax(t, -1) - torch.log_softmax(s, -1)).abs().max().item()
    return kl_error(lp, spread) * temperature**2 + ce_weight * logprob_error(s_logits, logits_error)


def gradient_errors(g, t_logits, s_logits, x, w, mask, temperature, ce_weight, logits_error):
    """Elementwise bounds on the fp32 gradients w.r.t. the student's hidden states x and head w, given the float64
    gradient g of the loss w.r.t. the loss positions' logits. Each entry of g is a probability (tempered or not)
    times at most 2 + 2 * spread log-probability differences, times T / N or ce_weight / N; with every
    log-probability within d, it moves by d times that (first order), and by its own eps-relative rounding.
    Then x.grad = g @ w and w.grad = g.T @ x: the propagated error |dg| @ |w| plus the rounding of their V- (or
    N-) term sums, summed(V) |g| @ |w|."""
    t, s = t_logits.double()[mask] / temperature, s_logits.double()[mask] / temperature
    d = max(logprob_error(t, logits_error / temperature), logprob_error(s, logits_error / temperature))
    d1 = logprob_error(s_logits.double()[mask], logits_error)
    spread = (torch.log_softmax(t, -1) - torch.log_softmax(s, -1)).abs().max().item()
    p, q, q1, n = t.softmax(-1), s.softmax(-1), (s * temperature).softmax(-1), int(mask.sum())
    dg = (temperature * (p + q) * d * (2 + 2 * spread) + ce_weight * q1 * d1) / n + summed(2) * g.abs()
    xs, ws = x.double()[mask].abs(), w.double().abs()
    x_bound = torch.full(x.shape, float("inf"), dtype=torch.float64)  # positions outside the loss: checked = 0
    x_bound[mask] = dg @ ws + summed(V) * (g.abs() @ ws)
    w_bound = dg.T @ xs + summed(n) * (g.abs().T @ xs)
    return x_bound, w_bound


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_match_float64_loop(kind, temperature):
    s_hidden, t_hidden, s_head, t_head, labels = make_inputs()
    got = distill_kl(s_hidden, t_hidden, loss_positions(labels), student_head=s_head, teacher_head=t_head,
                     kind=kind, temperature=temperature, jsd_beta=0.3, chunk=3)
    want = reference(t_hidden @ t_head.T, s_hidden @ s_head.T, labels, kind, temperature, beta=0.3)
    # fp32 logits (chunked, and in the reference) and log-softmaxes vs float64: see divergence_error
    bound = divergence_error(t_hidden @ t_head.T, s_hidden @ s_head.T, temperature,
                             2 * logit_error((s_hidden, s_head), (t_hidden, t_head)))
    within(abs(float(got) - float(want)), bound)


def test_cross_entropy_term_matches_reference():
    s_hidden, t_hidden, s_head, t_head, labels = make_inputs(1)
    got = distill_kl(s_hidden @ s_head.T, t_hidden @ t_head.T, loss_positions(labels), ce_weight=0.7, labels=labels)
    want = reference(t_hidden @ t_head.T, s_hidden @ s_head.T, labels, "forward", 1.0, ce_weight=0.7)
    # the same fp32 logits on both sides: only the log-softmaxes' rounding (see divergence_error)
    within(abs(float(got) - float(want)), divergence_error(t_hidden @ t_head.T, s_hidden @ s_head.T, 1.0,
                                                           ce_weight=0.7))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_autograd_float64(kind):
    """The eagerly computed chunk gradients equal autograd through a float64 full-vocabulary loss."""
    s_hidden, t_hidden, s_head, t_head, labels = make_inputs(2)
    mask = loss_positions(labels)
    x, w = s_hidden.clone().requires_grad_(), s_head.clone().requires_grad_()
    distill_kl(x, t_hidden, mask, student_head=w, teacher_head=t_head, kind=kind, temperature=1.5,
               ce_weight=0.2, labels=labels, chunk=4).backward()

    x64, w64 = s_hidden.double().requires_grad_(), s_head.double().requires_grad_()
    logits64 = x64 @ w64.T
    logits64.retain_grad()
    s = torch.log_softmax(logits64[mask] / 1.5, -1)
    t = torch.log_softmax((t_hidden.double() @ t_head.double().T)[mask] / 1.5, -1)
    if kind == "forward":
        div = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse":
        div = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(0.5), s + math.log(0.5)]), 0)
        div = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    ce = torch.nn.functional.cross_entropy(logits64[mask], labels[:, 1:][mask[:, :-1]], reduction="none")
    ((div * 1.5**2 + 0.2 * ce).mean()).backward()
    # fp32 gradients vs float64, elementwise (see gradient_errors); masked positions must get exactly 0
    x_bound, w_bound = gradient_errors(logits64.grad[mask], t_hidden @ t_head.T, s_hidden @ s_head.T, s_hidden,
                                       s_head, mask, 1.5, 0.2, logit_error((s_hidden, s_head), (t_hidden, t_head)))
    assert (x.grad[~mask] == 0).all()
    within(((x.grad.double() - x64.grad).abs()[mask] / x_bound[mask]).max().item(), 1.0, "x")
    within(((w.grad.double() - w64.grad).abs() / w_bound).max().item(), 1.0, "w")


def test_chunked_equals_unchunked():
    s_hidden, t_hidden, s_head, t_head, labels = make_inputs(3)
    mask = loss_positions(labels)
    results = []
    for chunk in (1, 5, 10_000):
        x = s_hidden.clone().requires_grad_()
        loss = distill_kl(x, t_hidden, mask, student_head=s_head, teacher_head=t_head, chunk=chunk)
        loss.backward()
        results.append((loss.detach(), x.grad))
    # the unchunked path: plain (B, L, V) logits through the same loss
    x = s_hidden.clone().requires_grad_()
    loss = distill_kl(x @ s_head.T, t_hidden @ t_head.T, mask, chunk=10_000)
    loss.backward()
    results.append((loss.detach(), x.grad))
    # other chunkings: the same fp32 terms in another order, so two results each within the float64 bounds
    # (divergence_error, gradient_errors for the forward KL at T = 1 without CE) differ by at most twice those
    t_logits, s_logits, errors = t_hidden @ t_head.T, s_hidden @ s_head.T, logit_error((s_hidden, s_head),
                                                                                       (t_hidden, t_head))
    loss_bound = 2 * divergence_error(t_logits, s_logits, 1.0, 2 * errors)
    logits64 = (s_hidden.double() @ s_head.double().T).requires_grad_()
    t64 = torch.log_softmax(t_logits.double()[mask], -1)
    (t64.exp() * (t64 - torch.log_softmax(logits64[mask], -1))).sum(-1).mean().backward()
    x_bound, _ = gradient_errors(logits64.grad[mask], t_logits, s_logits, s_hidden, s_head, mask, 1.0, 0.0,
                                 2 * errors)
    for got_loss, got_grad in results[1:]:
        within(abs(float(got_loss) - float(results[0][0])), loss_bound, "loss")
        within(((got_grad - results[0][1]).abs()[mask] / (2 * x_bound[mask])).max().item(), 1.0, "gradient")


def test_masked_positions_contribute_nothing():
    """Changing the logits at pad/prompt positions changes neither the loss nor any gradient."""
    s_hidden, t_hidden, s_head, t_head, labels = make_inputs(4)
    mask = loss_positions(labels)
    assert not mask[0, :2].any() and not mask[1, -3:].any() and mask[0, 3:].any()

    def run(s, t):
        x = s.clone().requires_grad_()
        loss = distill_kl(x, t, mask, student_head=s_head, teacher_head=t_head, kind="jsd", chunk=2)
        loss.backward()
        return loss.detach(), x.grad

    loss, grad = run(s_hidden, t_hidden)
    s2, t2 = s_hidden.clone(), t_hidden.clone()
    s2[~mask] = 100 * torch.randn_like(s2[~mask])
    t2[~mask] = -50.0
    loss2, grad2 = run(s2, t2)
    # the masked positions are dropped before any arithmetic, so the rest is the same computation bit for bit
    assert torch.equal(loss, loss2)
    assert torch.equal(grad[mask], grad2[mask])
    assert (grad[~mask] == 0).all()
    # and the mean is over loss tokens only: the sum divided by the number of loss positions
    total = distill_kl(s_hidden, t_hidden, mask, student_head=s_head, teacher_head=t_head, kind="jsd", reduction="sum")
    # the sum here is chunked otherwise (the default chunk, not 2): the same fp32 terms in another order, each
    # result within divergence_error of the float64 mean (the JSD's spread is at most the KL's)
    errors = 2 * logit_error((s_hidden, s_head), (t_hidden, t_head))
    within(abs(float(total / mask.sum()) - float(loss)),
           2 * divergence_error(t_hidden @ t_head.T, s_hidden @ s_head.T, 1.0, errors))


def test_no_loss_tokens_gives_zero():
    s_hidden, t_hidden, s_head, t_head, labels = make_inputs(5)
    labels[:] = -100
    assert float(distill_kl(s_hidden, t_hidden, loss_positions(labels), student_head=s_head, teacher_head=t_head)) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_topk_is_the_divergence_of_the_distributions_coarsened_to_k_plus_tail(kind):
    s_hidden, t_hidden, s_head, t_head, labels = make_inputs(6)
    mask = loss_positions(labels)
    t_logits, s_logits = t_hidden @ t_head.T, s_hidden @ s_head.T
    temperature, k = 2.0, 4
    t_logp = torch.log_softmax(t_logits / temperature, -1)
    values, indices = t_logp.topk(k, -1)
    got = distill_kl(s_logits, TopK(values, indices), mask, kind=kind, temperature=temperature, chunk=3)

    # float64 reference: pool everything outside the teacher's top-k into one outcome, then the divergence
    total = 0.0
    for b, i in mask.nonzero().tolist():
        pt = torch.softmax(t_logits[b, i].double() / temperature, -1)
        ps = torch.softmax(s_logits[b, i].double() / temperature, -1)
        top = indices[b, i]
        p = torch.cat([pt[top], 1 - pt[top].sum(0, keepdim=True)])
        q = torch.cat([ps[top], 1 - ps[top].sum(0, keepdim=True)])
        if kind == "forward":
            div = (p * (p / q).log()).sum()
        elif kind == "reverse":
            div = (q * (q / p).log()).sum()
        else:
            m = (p + q) / 2
            div = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
        total += float(div) * temperature**2
    # fp32 vs float64: the k kept log-probabilities within logprob_error (divergence_error); the pooled tail
    # 1 - sum(top-k) is a (k + 1)-term sum of probabilities, off by summed(k + 1) absolute, which moves its log by
    # that over the tail's mass (the cancellation when the top-k hold nearly all of it): its KL term p log(p / q)
    # by at most that times (2 + spread) and by the same over q's tail
    tails = [1 - torch.softmax(logits.double() / temperature, -1).gather(-1, indices).sum(-1)
             for logits in (t_logits, s_logits)]
    tail_error = summed(k + 1) / min(tail[mask].min().item() for tail in tails)
    spread = (torch.log_softmax(t_logits.double() / temperature, -1)
              - torch.log_softmax(s_logits.double() / temperature, -1)).abs().max().item()
    spread = max(spread, max((tails[0][mask].log() - tails[1][mask].log()).abs().max().item(), 0.0))
    bound = divergence_error(t_logits, s_logits, temperature) + kl_error(tail_error, spread) * temperature**2
    within(abs(float(got) - total / int(mask.sum())), bound, "pooled")
    # a lower bound on the full divergence (pooling can only lose information), up to both results' rounding
    full = distill_kl(s_logits, t_logits, mask, kind=kind, temperature=temperature)
    assert float(got) <= float(full) + bound + divergence_error(t_logits, s_logits, temperature)
    values, indices = t_logp.topk(V, -1)
    exact = distill_kl(s_logits, TopK(values, indices), mask, kind=kind, temperature=temperature)
    # the same divergence through the top-k path: both within divergence_error of the float64 value
    within(abs(float(exact) - float(full)), 2 * divergence_error(t_logits, s_logits, temperature), "k = V")


def test_bf16_inputs_give_an_fp32_loss():
    s_hidden, t_hidden, s_head, t_head, labels = make_inputs(7)
    x = s_hidden.bfloat16().requires_grad_()
    loss = distill_kl(x, t_hidden.bfloat16(), loss_positions(labels), student_head=s_head.bfloat16(),
                      teacher_head=t_head.bfloat16())
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("objective", ALIGNMENT_OBJECTIVES)
def test_alignment_loss_matches_loop(objective):
    g = torch.Generator().manual_seed(8)
    pred, target = torch.randn(B, L, H, generator=g), 3 * torch.randn(B, L, H, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.3
    tokens = mask.nonzero().tolist()
    layer_mean_square = sum(float(target[b, i, h]) ** 2 for b, i in tokens for h in range(H)) / (len(tokens) * H)
    total = 0.0
    for b, i in tokens:
        squared = sum((float(pred[b, i, h]) - float(target[b, i, h])) ** 2 for h in range(H))
        err = squared ** 0.5 if objective == "l2" else squared / H
        if objective == "token_normalized_mse":
            err /= sum(float(target[b, i, h]) ** 2 for h in range(H)) / H
        if objective == "layer_normalized_mse":
            err /= layer_mean_square
        total += err
    got = alignment_loss(pred, target, mask, objective=objective)
    # fp32 against a float64 loop: every quantity is a sum of positive terms (relative error summed(n)); the
    # longest chain sums H squares per token, the layer's mean square over all tokens' H values, then the mean
    # over tokens, with a few divisions and a square root between
    tokens_n = len(tokens)
    within(abs(float(got) / (total / tokens_n) - 1), summed(H + tokens_n * H + tokens_n + 4))


def test_unknown_kind_is_a_one_line_error():
    s_hidden, t_hidden, s_head, t_head, labels = make_inputs()
    with pytest.raises(ValueError, match="use one of forward, reverse, jsd"):
        distill_kl(s_hidden, t_hidden, loss_positions(labels), student_head=s_head, teacher_head=t_head, kind="kl")
