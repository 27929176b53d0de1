"""Mamba-1 selective scan in chunks with PyTorch ops: the fast path without mamba-ssm.

A is a (d, n) matrix, so Mamba-2's matmul form does not apply. Inside a chunk of T steps, with cs the
cumulative sum of delta * A from the chunk start, the zero-start state is exp(cs_t) * sum_{j<=t} exp(-cs_j) x_j:
one cumsum instead of T dependent steps (cs measured from the chunk's first step). That is exact, and safe in
fp32 as long as |cs| stays well inside exp's range, so T is chosen per call from the largest |delta * A|
(T = 1 degenerates to the plain loop).
A loop over chunks then carries the state. Memory is O(b d n l).
"""

import torch
import torch.nn.functional as F

from .selective_scan_naive import finish_selective_scan, prepare_selective_scan
from .ssd_chunked import StatePassing, decay_exp

MAX_CHUNK = 64
MAX_LOG_RANGE = 40.0  # largest |cs| inside a chunk: exp(40) ~ 2e17, far from fp32 overflow


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    delta, B, C = prepare_selective_scan(u, delta, A, B, C, delta_bias, delta_softplus)
    f = delta.dtype
    b, d, l = u.shape
    n = A.shape[1]
    dA = delta[:, :, None, :] * A.to(f)[..., None]  # (b, d, n, l)
    steepest = dA.detach().abs().max().item() if dA.numel() else 0.0
    T = MAX_CHUNK
    while T > 1 and (T - 1) * steepest > MAX_LOG_RANGE:
        T //= 2
    pad = (-l) % T
    c = (l + pad) // T
    dBu = (delta * u.to(f))[:, :, None, :] * B
    dA, dBu, C = (F.pad(t, (0, pad)).view(b, d, n, c, T) for t in (dA, dBu, C))

    cs = dA.cumsum(-1)
    rel = cs - cs[..., :1]  # within (T - 1) * steepest of zero, so exp(+-rel) stays finite
    local = torch.exp(rel) * (torch.exp(-rel) * dBu).cumsum(-1)  # state inside each chunk, zero at its start
    from_start = decay_exp(cs)
    incoming, state = StatePassing.apply(local[..., -1].movedim(-1, 0), from_start[..., -1].movedim(-1, 0),
                                         u.new_zeros(b, d, n, dtype=f))
    states = local + from_start * incoming.movedim(0, -1)[..., None]
    y = (states * C).sum(2).view(b, d, c * T)[..., :l]
    out = finish_selective_scan(y, u, D, z, f)
    return (out, state.to(u.dtype)) if return_last_state else out
