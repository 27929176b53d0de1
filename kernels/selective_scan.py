"""Mamba-1 selective scan with PyTorch ops: the fast path without mamba-ssm.

A is a (d, n) matrix, so Mamba-2's matmul form does not apply and the work is elementwise. The cheapest exact
form on a CPU is the recurrence itself, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, with everything that does
not depend on h computed for all steps at once, time as the leading (contiguous) axis, and the loop over time
run as one autograd node (`StatePassing`: in-place updates forward and backward, no per-step graph). Memory is
O(b d n l), like mambapy's parallel scan.
"""

import torch

from .selective_scan_naive import finish_selective_scan, prepare_selective_scan
from .ssd_chunked import StatePassing, decay_exp


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    delta, B, C = prepare_selective_scan(u, delta, A, B, C, delta_bias, delta_softplus)
    f = delta.dtype
    b, d, _ = u.shape
    steps = delta.permute(2, 0, 1)[..., None]  # (l, b, d, 1)
    decay = decay_exp(steps * A.to(f))  # (l, b, d, n)
    inputs = (steps * u.to(f).permute(2, 0, 1)[..., None]) * B.permute(3, 0, 1, 2)
    incoming, state = StatePassing.apply(inputs, decay, u.new_zeros(b, d, A.shape[1], dtype=f))
    states = torch.cat([incoming[1:], state[None]])  # the state after each step
    y = (states * C.permute(3, 0, 1, 2)).sum(-1).permute(1, 2, 0)
    out = finish_selective_scan(y, u, D, z, f)
    return (out, state.to(u.dtype)) if return_last_state else out
