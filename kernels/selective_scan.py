"""Mamba-1 selective scan with PyTorch ops: the fast path without mamba-ssm.

A is a (d, n) matrix, so Mamba-2's matmul form does not apply and the work is elementwise: on a CPU the
recurrence stepped in time on cache-sized (b, d, n) tensors is the cheapest exact form (the parallel scans of
mambapy and friends materialise several (b, l, d, n) tensors and stream them through memory). What this path adds
over the plain loop of `selective_scan_naive` is memory: time is cut into segments of SEGMENT steps and each
segment is recomputed in the backward (activation checkpointing), so training keeps O(b d l) activations plus one
(b, d, n) state per segment instead of O(b d n l).
"""

import torch
from torch.utils.checkpoint import checkpoint

from .selective_scan_naive import finish_selective_scan, prepare_selective_scan

SEGMENT = 64


def scan_segment(state, A, delta, delta_u, B, C):
    """The recurrence over one segment. state (b, g, d/g, n); A (g, d/g, n); delta, delta_u (b, g, d/g, k);
    B, C (b, g, 1, n, k), broadcast over each group's channels. Returns y (b, g, d/g, k) and the state."""
    ys = []
    for delta_t, delta_u_t, B_t, C_t in zip(delta.unbind(-1), delta_u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        state = torch.exp(delta_t[..., None] * A) * state + delta_u_t[..., None] * B_t
        ys.append((state * C_t).sum(-1))
    return torch.stack(ys, dim=-1), state


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    delta, B, C = prepare_selective_scan(u, delta, A, B, C, delta_bias, delta_softplus, expand=False)
    f = delta.dtype
    b, d, l = u.shape
    g, n = B.shape[1], A.shape[1]
    A = A.to(f).view(g, d // g, n)
    state = u.new_zeros(b, g, d // g, n, dtype=f)
    # B and C stay per group (never expanded to (b, d, n, l)), so their gradients are O(b g n l) too
    per_group = (t.view(b, g, d // g, l) for t in (delta, delta * u.to(f)))
    pieces = zip(*(t.split(SEGMENT, dim=-1) for t in (*per_group, B, C)))
    ys = []
    for segment in pieces:
        if torch.is_grad_enabled():
            y, state = checkpoint(scan_segment, state, A, *segment, use_reentrant=False)
        else:
            y, state = scan_segment(state, A, *segment)
        ys.append(y)
    out = finish_selective_scan(torch.cat(ys, dim=-1).view(b, d, l), u, D, z, f)
    return (out, state.view(b, d, n).to(u.dtype)) if return_last_state else out
