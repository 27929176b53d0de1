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

from .common import check_ssd_shapes, compute_dtype, empty_scan, process_dt, skip_and_gate


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
