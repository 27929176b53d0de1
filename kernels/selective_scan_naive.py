"""Mamba-1 selective scan as a sequential loop: the definition (mamba-ssm's `selective_scan_ref`).

u, delta, z are (b, d, l); A is (d, n); B and C are (b, n, l) or (b, g, n, l) with channel i reading group
i // (d // g); D and delta_bias are (d,). Per channel and state index:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t,    y_t = C_t . h_t + D * u_t,   out = y * silu(z)
"""

import torch

from .common import finish_selective_scan, prepare_selective_scan


def selective_scan_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    delta, B, C = prepare_selective_scan(u, delta, A, B, C, delta_bias, delta_softplus)
    f = delta.dtype
    uf, A = u.to(f), A.to(f)
    state = u.new_zeros(*u.shape[:2], A.shape[1], dtype=f)
    ys = []
    # unbind, not indexing: one autograd node for all steps instead of a full-size gradient buffer per step
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(-1), uf.unbind(-1), B.unbind(-1), C.unbind(-1)):
        state = torch.exp(delta_t[..., None] * A) * state + (delta_t * u_t)[..., None] * B_t
        ys.append((state * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else torch.zeros_like(uf)  # an empty sequence: empty y, zero state
    out = finish_selective_scan(y, u, D, z, f)
    return (out, state.to(u.dtype)) if return_last_state else out
