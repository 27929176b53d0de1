"""One decode step of the selective state update as a Triton kernel (CUDA; TRITON_INTERPRET=1 on CPU).

Same contract as `state_update.selective_state_update_torch`: Mamba-2 or Mamba-1 shapes, the state updated in
place in its own dtype, fp32 arithmetic. One program per (batch, head, block of head channels). Decoding runs
without gradients, so there is no backward.
"""

import torch

from .state_update import as_mamba2_shapes

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only machines import this module but never call it
    triton = None

if triton is not None:

    @triton.jit
    def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, y_ptr,
                             H, G, P, N, heads_per_group,
                             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
                             DT_SOFTPLUS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_h = tl.program_id(1)
        offs_p = tl.program_id(2) * BP + tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        mask_p = offs_p < P
        mask_pn = mask_p[:, None] & (offs_n[None, :] < N)
        bh = pid_b * H + pid_h
        hp = pid_h * P + offs_p  # index into (h, p) parameters
        state_offs = (bh * P + offs_p[:, None]) * N + offs_n[None, :]
        state = tl.load(state_ptr + state_offs, mask=mask_pn, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + bh * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + bh * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += tl.load(dt_bias_ptr + hp, mask=mask_p, other=0.0).to(tl.float32)
        if DT_SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        A = tl.load(A_ptr + hp[:, None] * N + offs_n[None, :], mask=mask_pn, other=0.0).to(tl.float32)
        bc_offs = (pid_b * G + pid_h // heads_per_group) * N + offs_n
        Bv = tl.load(B_ptr + bc_offs, mask=offs_n < N, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + bc_offs, mask=offs_n < N, other=0.0).to(tl.float32)
        state = tl.exp(dt[:, None] * A) * state + (dt * x)[:, None] * Bv[None, :]
        tl.store(state_ptr + state_offs, state, mask=mask_pn)
        y = tl.sum(state * Cv[None, :], axis=1)
        if HAS_D:
            y += x * tl.load(D_ptr + hp, mask=mask_p, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + bh * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(y_ptr + bh * P + offs_p, y, mask=mask_p)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    if triton is None:
        raise ValueError("the triton kernel backend needs the triton package; pip install triton or set "
                         "DISTILL_KERNELS=torch")
    mamba1 = state.dim() == 3
    s, x, dt, A, B, C, D, z, dt_bias = as_mamba2_shapes(state, x, dt, A, B, C, D, z, dt_bias)
    b, h, p, n = s.shape
    work = s if s.is_contiguous() else s.contiguous()
    y = torch.empty_like(x)
    BP, BN = min(triton.next_power_of_2(p), 64), triton.next_power_of_2(n)
    dummy = x
    _state_update_kernel[(b, h, triton.cdiv(p, BP))](
        work, x.contiguous(), dt.expand(b, h, p).contiguous(), A.expand(h, p, n).contiguous(),
        B.contiguous(), C.contiguous(), D.expand(h, p).contiguous() if D is not None else dummy,
        z.contiguous() if z is not None else dummy,
        dt_bias.expand(h, p).contiguous() if dt_bias is not None else dummy, y,
        h, B.shape[1], p, n, h // B.shape[1],
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        BP=BP, BN=BN)
    if work is not s:
        s.copy_(work)
    return y[:, 0] if mamba1 else y
