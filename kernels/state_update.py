"""One decode step of the selective state space recurrence (mamba-ssm's `selective_state_update`).

Mamba-2 shapes: state (b, h, p, n), x (b, h, p), dt (b, h, p) or (b, h), A (h, p, n) or (h,), B and C
(b, g, n), D (h, p) or (h,), z (b, h, p), dt_bias (h, p) or (h,). Mamba-1 shapes: state (b, d, n), x (b, d),
dt (b, d), A (d, n), B and C (b, n), D (d,), z (b, d), dt_bias (d,). The state is updated in place (in its own
dtype) and the output has x's dtype; the arithmetic is fp32.
"""

import torch
import torch.nn.functional as F

from .common import compute_dtype


def as_mamba2_shapes(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """Mamba-1 tensors as a one-head Mamba-2 step; per-head A/D/dt/dt_bias broadcast over (p, n)."""
    if state.dim() == 3:
        state, x, dt, B, C = state[:, None], x[:, None], dt[:, None], B[:, None], C[:, None]
        A = A[None]
        D = D[None] if D is not None else None
        z = z[:, None] if z is not None else None
        dt_bias = dt_bias[None] if dt_bias is not None else None
    b, h, p, n = state.shape
    if x.shape != (b, h, p) or B.shape[0] != b or B.shape[-1] != n or B.shape != C.shape or h % B.shape[1]:
        raise ValueError(f"selective_state_update: shapes do not match state {tuple(state.shape)}: x {tuple(x.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}")
    if dt.dim() == 2:
        dt = dt[..., None]
    if A.dim() == 1:
        A = A[:, None, None]
    if D is not None and D.dim() == 1:
        D = D[:, None]
    if dt_bias is not None and dt_bias.dim() == 1:
        dt_bias = dt_bias[:, None]
    return state, x, dt, A, B, C, D, z, dt_bias


def selective_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    mamba1 = state.dim() == 3
    s, x, dt, A, B, C, D, z, dt_bias = as_mamba2_shapes(state, x, dt, A, B, C, D, z, dt_bias)
    f = compute_dtype(x.dtype)
    h, g = s.shape[1], B.shape[1]
    dt = dt.to(f) + (dt_bias.to(f) if dt_bias is not None else 0)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.expand(x.shape)
    B = B.to(f).repeat_interleave(h // g, dim=1)[:, :, None]  # (b, h, 1, n)
    C = C.to(f).repeat_interleave(h // g, dim=1)[:, :, None]
    new = torch.exp(dt[..., None] * A.to(f)) * s.to(f) + (dt * x.to(f))[..., None] * B
    s.copy_(new)
    y = (new * C).sum(-1)
    if D is not None:
        y = y + x.to(f) * D.to(f)
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(x.dtype)
    return y[:, 0] if mamba1 else y
