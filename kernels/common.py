"""What every scan implementation shares: the inputs' checks and preprocessing, the compute dtype, and the
epilogues. The references (`*_naive.py`) and the fast paths all import from here, never from each other, so
each fast path is tested against a reference that shares only these few lines with it.

Mamba-2 (SSD) shapes follow mamba-ssm's `mamba_chunk_scan_combined`, Mamba-1's its `selective_scan_fn` (see
`ssd_naive.py` and `selective_scan_naive.py` for the definitions).
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
    """The scan of an empty sequence (l = 0): an empty y, and the initial state (zeros without one) as the
    final state, in x's dtype."""
    y = torch.empty_like(x)
    if not return_final_states:
        return y
    b, _, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[3]) if initial_states is None else initial_states.to(x.dtype, copy=True)
    return y, state


def document_index(seq_idx):
    """(b, l) counter that increases by one at every change of seq_idx, so equal values mean one document."""
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return F.pad(changes.cumsum(1, dtype=torch.int32), (1, 0))


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
