"""Mamba-2 (SSD) scan as a sequential loop: the definition every fast path is tested against.

Shapes follow mamba-ssm's `mamba_chunk_scan_combined`: x (b, l, h, p), dt (b, l, h), A (h,), B and C
(b, l, g, n) with head i reading group i // (h // g), D (h,) or (h, p), z (b, l, h, p), states (b, h, p, n).
The recurrence, per head, is

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T,    y_t = state_t C_t + D * x_t

and the output is gated by silu(z) when z is given. `seq_idx` (b, l) marks documents packed into one row:
the state is reset to zero wherever seq_idx changes; `initial_states` is the state before position 0.
"""

import math

import torch
import torch.nn.functional as F


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf), dtype=torch.float32):
    """dt in the compute dtype, with the bias, softplus and clamp mamba-ssm applies (in that order)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def compute_dtype(dtype):
    """fp32 for fp32/bf16/fp16 inputs, float64 for float64 (so the references can run in double)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_ssd_shapes(x, dt, A, B, C, D=None, z=None, initial_states=None, seq_idx=None):
    """One-line errors for the shape mistakes a caller can make."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (batch, seqlen, nheads) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (nheads,) = ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(f"B and C must both be (batch, seqlen, ngroups, dstate), got {tuple(B.shape)} and {tuple(C.shape)}")
    if h % B.shape[2]:
        raise ValueError(f"nheads ({h}) must be a multiple of ngroups ({B.shape[2]})")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be (nheads,) or (nheads, headdim), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"initial_states must be (batch, nheads, headdim, dstate) = {(b, h, p, B.shape[3])}, "
                         f"got {tuple(initial_states.shape)}")
    if seq_idx is not None and seq_idx.shape != (b, l):
        raise ValueError(f"seq_idx must be (batch, seqlen) = {(b, l)}, got {tuple(seq_idx.shape)}")


def skip_and_gate(y, x, D=None, z=None):
    """y + D * x, then * silu(z): the epilogue shared by every SSD implementation (all in y's dtype)."""
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D).to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def empty_scan(x, B, initial_states, return_final_states):
    """The scan of an empty sequence (l = 0): an empty y, and the initial state (zeros without one) as the final
    state, in x's dtype."""
    y = torch.empty_like(x)
    if not return_final_states:
        return y
    b, _, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[3]) if initial_states is None else initial_states.to(x.dtype, copy=True)
    return y, state


def ssd_naive(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
              dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False):
    """Sequential SSD scan; `chunk_size` is accepted for signature compatibility and ignored."""
    check_ssd_shapes(x, dt, A, B, C, D, z, initial_states, seq_idx)
    if not x.shape[1]:
        return empty_scan(x, B, initial_states, return_final_states)
    b, _, h, p = x.shape
    f = compute_dtype(x.dtype)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, f)
    heads_per_group = h // B.shape[2]
    B = B.to(f).repeat_interleave(heads_per_group, dim=2)
    C = C.to(f).repeat_interleave(heads_per_group, dim=2)
    xf = x.to(f)
    A = A.to(f)
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=f) if initial_states is None else initial_states.to(f)
    ys = []
    # unbind, not indexing: one autograd node for all steps instead of a full-size gradient buffer per step
    for t, (dt_t, x_t, B_t, C_t) in enumerate(zip(dt.unbind(1), xf.unbind(1), B.unbind(1), C.unbind(1))):
        if seq_idx is not None and t > 0:
            same_doc = (seq_idx[:, t] == seq_idx[:, t - 1]).to(f)
            state = state * same_doc[:, None, None, None]
        decay = torch.exp(dt_t * A)  # (b, h)
        state = decay[:, :, None, None] * state + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append((state * C_t[:, :, None, :]).sum(-1))
    y = skip_and_gate(torch.stack(ys, dim=1), xf, D, z).to(x.dtype)
    return (y, state.to(x.dtype)) if return_final_states else y
