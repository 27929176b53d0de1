"""Mamba-1 selective scan with PyTorch ops: the fast path without mamba-ssm.

A is a (d, n) matrix, so Mamba-2's matmul form does not apply and the work is elementwise. Time is cut into
segments of SEGMENT steps. Each segment computes its decays exp(delta_t A) and inputs delta_t u_t B_t for all its
steps at once, as time-major (steps, b, d, n) tensors, and runs the recurrence h_t = decay_t h_{t-1} + input_t as
the Mamba-2 scan's state carry: `StatePassing` (one multiply-add per step, one autograd node) or, without
autograd, the same ops in place (`pass_states_`), so both give the same bits. The outputs C_t . h_t are one
batched matrix-vector product. Each segment is recomputed in the backward (activation checkpointing), so
training keeps O(b d l) activations plus one (b, d, n) state per segment, never O(b d n l) (the parallel scans
of mambapy and friends materialise several such tensors).
"""

import torch
from torch.utils.checkpoint import checkpoint

from .common import finish_selective_scan, prepare_selective_scan
from .state_passing import StatePassing, pass_states_

SEGMENT = 64


def scan_segment(state, A, delta, delta_u, B, C):
    """The recurrence over one segment of k steps, time-major: state (b, g, d/g, n); A (g, d/g, n); delta and
    delta_u (k, b, g, d/g); B and C (k, b, g, n), shared by each group's channels. Returns y (k, b, g, d/g) and
    the state after the segment."""
    k, b, g, dg = delta.shape
    n = A.shape[-1]
    delta, delta_u, B = delta.contiguous(), delta_u.contiguous(), B.contiguous()  # time-major in memory too
    decay = torch.exp(delta[..., None] * A)  # (k, b, g, d/g, n)
    if torch.is_grad_enabled():
        incoming, state = StatePassing.apply(delta_u[..., None] * B[:, :, :, None], decay, state)
        h = torch.cat([incoming[1:], state[None]])  # h_t = incoming[t + 1]
    else:  # the same ops in place: slot 0 holds the state coming in, slot t + 1 the input of step t, then h_t
        slots = state.new_empty(k + 1, *state.shape)
        slots[0] = state
        torch.mul(delta_u[..., None], B[:, :, :, None], out=slots[1:])
        h = pass_states_(slots, decay)[1:]
        state = h[-1].clone()
    # y_t = h_t C_t: per step and group a (d/g, n) @ (n,) product
    y = torch.matmul(h.view(k * b * g, dg, n), C.reshape(k * b * g, n, 1))
    return y.view(k, b, g, dg), state


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    delta, B, C = prepare_selective_scan(u, delta, A, B, C, delta_bias, delta_softplus, expand=False)
    f = delta.dtype
    b, d, l = u.shape
    g, n = B.shape[1], A.shape[1]
    A = A.to(f).view(g, d // g, n)
    state = u.new_zeros(b, g, d // g, n, dtype=f)
    # time-major per segment; B and C stay per group (never expanded to (b, d, n, l)), so their gradients are
    # O(b g n l) too
    per_group = (t.view(b, g, d // g, l).permute(3, 0, 1, 2) for t in (delta, delta * u.to(f)))
    per_state = (t[:, :, 0].permute(3, 0, 1, 2) for t in (B, C))  # (l, b, g, n)
    pieces = zip(*(t.split(SEGMENT, dim=0) for t in (*per_group, *per_state)))
    ys = []
    for segment in pieces if l else ():  # split gives an empty sequence one empty piece
        if torch.is_grad_enabled():
            y, state = checkpoint(scan_segment, state, A, *segment, use_reentrant=False)
        else:
            y, state = scan_segment(state, A, *segment)
        ys.append(y)
    # an empty sequence: empty y, zero state
    y = torch.cat(ys).permute(1, 2, 3, 0).reshape(b, d, l) if ys else u.new_zeros(b, d, 0, dtype=f)
    out = finish_selective_scan(y, u, D, z, f)
    return (out, state.view(b, d, n).to(u.dtype)) if return_last_state else out
