"""Mamba-1 selective scan as a sequential loop: the definition (mamba-ssm's `selective_scan_ref`).

u, delta, z are (b, d, l); A is (d, n); B and C are (b, n, l) or (b, g, n, l) with channel i reading group
i // (d // g); D and delta_bias are (d,). Per channel and state index:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t,    y_t = C_t . h_t + D * u_t,   out = y * silu(z)
"""

import torch
import torch.nn.functional as F

from .ssd_naive import compute_dtype, process_dt


def prepare_selective_scan(u, delta, A, B, C, delta_bias, delta_softplus, expand=True):
    """Checks shapes; returns delta (processed) and B, C expanded to (b, d, n, l) (or, with expand=False, as
    (b, g, 1, n, l) to broadcast over each group's channels), all in the compute dtype."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, seqlen), got {tuple(u.shape)} and {tuple(delta.shape)}")
    b, d, l = u.shape
    if A.shape[0] != d or A.dim() != 2 or A.is_complex():
        raise ValueError(f"A must be a real (dim, dstate) = ({d}, n) tensor, got {tuple(A.shape)} {A.dtype}")
    if B.dim() not in (3, 4) or B.shape != C.shape or B.shape[0] != b or B.shape[-2:] != (A.shape[1], l):
        raise ValueError(f"B and C must be (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen) with dstate "
                         f"{A.shape[1]} and seqlen {l}; got {tuple(B.shape)} and {tuple(C.shape)}")
    f = compute_dtype(u.dtype)
    delta = process_dt(delta, delta_bias[:, None] if delta_bias is not None else None, delta_softplus, dtype=f)

    def per_channel(M):
        M = M.to(f)
        if M.dim() == 3:
            M = M[:, None]
        if d % M.shape[1]:
            raise ValueError(f"dim ({d}) must be a multiple of ngroups ({M.shape[1]})")
        return M.repeat_interleave(d // M.shape[1], dim=1) if expand else M[:, :, None]

    return delta, per_channel(B), per_channel(C)


def finish_selective_scan(y, u, D, z, f):
    if D is not None:
        y = y + u.to(f) * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(u.dtype)


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
