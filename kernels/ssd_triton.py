"""Mamba-2 (SSD) scan as fused Triton kernels, forward and backward: the path for CUDA without mamba-ssm.

One program per (batch, head) walks the chunks in order with the (p, n) state in registers; inside a chunk it
does the same four steps as `ssd_chunked` with `tl.dot` (intra-chunk scores, output from the incoming state,
state update). The forward stores each chunk's incoming state (O(L / Q * p * n)); the backward walks the
chunks in reverse, carrying the state gradient, and recomputes everything else. dt's bias/softplus/clamp and
the D / z epilogue stay in PyTorch (autograd), so the kernels only see the recurrence itself.

Verified on CPU with TRITON_INTERPRET=1 (tests/test_kernels_triton.py). Dots use input_precision="ieee", so
fp32 results match the references to ~1e-6; the chunk size is rounded to a power of two in [16, 64] (it does not
change the result, only register use).
"""

import math

import torch

from .common import check_ssd_shapes, document_index, empty_scan, process_dt, skip_and_gate

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only machines import this module but never call it
    triton = None

if triton is not None:

    @triton.jit
    def _chunk_inputs(x_ptr, dt_ptr, B_ptr, C_ptr, doc_ptr, A, pid_b, pid_h, grp, c, doc_in,
                      L, H, G, P, N, HAS_DOC: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        """Loads chunk c and builds its decays: the part forward and backward share."""
        offs_q = tl.arange(0, Q)
        offs_p = tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        t = c * Q + offs_q
        in_seq = t < L
        row = pid_b * L + t
        x = tl.load(x_ptr + (row[:, None] * H + pid_h) * P + offs_p[None, :],
                    mask=in_seq[:, None] & (offs_p[None, :] < P), other=0.0)
        dt = tl.load(dt_ptr + row * H + pid_h, mask=in_seq, other=0.0)  # dt = 0 past the end: no decay, no input
        bc_offs = (row[:, None] * G + grp) * N + offs_n[None, :]
        bc_mask = in_seq[:, None] & (offs_n[None, :] < N)
        Bm = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0)
        Cm = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0)
        cs = tl.cumsum(dt * A, axis=0)
        cs_last = tl.sum(tl.where(offs_q == Q - 1, cs, 0.0), axis=0)
        keep = offs_q[:, None] >= offs_q[None, :]
        e = tl.exp(cs)  # decay from the chunk start
        w = tl.exp(cs_last - cs)  # decay to the chunk end
        e_last = tl.exp(cs_last)
        if HAS_DOC:
            doc = tl.load(doc_ptr + pid_b * L + tl.minimum(t, L - 1))
            doc_last = tl.load(doc_ptr + pid_b * L + tl.minimum(c * Q + Q - 1, L - 1))
            keep = keep & (doc[:, None] == doc[None, :])
            e = tl.where(doc == doc_in, e, 0.0)
            w = tl.where(doc == doc_last, w, 0.0)
            e_last = tl.where(doc_last == doc_in, e_last, 0.0)
        decay = tl.exp(tl.where(keep, cs[:, None] - cs[None, :], -float("inf")))
        return x, dt, Bm, Cm, e, w, e_last, decay

    @triton.jit
    def _ssd_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, doc_ptr, init_ptr, y_ptr, states_ptr, final_ptr,
                        L, H, G, P, N, n_chunks, heads_per_group,
                        HAS_DOC: tl.constexpr, HAS_INIT: tl.constexpr,
                        Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_h = tl.program_id(1)
        grp = pid_h // heads_per_group
        A = tl.load(A_ptr + pid_h)
        offs_q = tl.arange(0, Q)
        offs_p = tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        pn_offs = offs_p[:, None] * N + offs_n[None, :]
        pn_mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
        bh = pid_b * H + pid_h
        state = tl.zeros((BP, BN), dtype=tl.float32)
        if HAS_INIT:
            state = tl.load(init_ptr + bh * P * N + pn_offs, mask=pn_mask, other=0.0)
        doc_in = 0
        if HAS_DOC:
            doc_in = tl.load(doc_ptr + pid_b * L)
        for c in range(n_chunks):
            x, dt, Bm, Cm, e, w, e_last, decay = _chunk_inputs(
                x_ptr, dt_ptr, B_ptr, C_ptr, doc_ptr, A, pid_b, pid_h, grp, c, doc_in,
                L, H, G, P, N, HAS_DOC, Q, BP, BN)
            tl.store(states_ptr + (bh * n_chunks + c) * P * N + pn_offs, state, mask=pn_mask)
            xdt = x * dt[:, None]
            scores = tl.dot(Cm, tl.trans(Bm), input_precision="ieee") * decay
            y = tl.dot(scores, xdt, input_precision="ieee")
            y += e[:, None] * tl.dot(Cm, tl.trans(state), input_precision="ieee")
            t = c * Q + offs_q
            tl.store(y_ptr + ((pid_b * L + t[:, None]) * H + pid_h) * P + offs_p[None, :], y,
                     mask=(t[:, None] < L) & (offs_p[None, :] < P))
            state = e_last * state + tl.dot(tl.trans(xdt), Bm * w[:, None], input_precision="ieee")
            if HAS_DOC:
                doc_in = tl.load(doc_ptr + pid_b * L + tl.minimum(c * Q + Q - 1, L - 1))
        tl.store(final_ptr + bh * P * N + pn_offs, state, mask=pn_mask)

    @triton.jit
    def _ssd_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, doc_ptr, states_ptr, dy_ptr, dfinal_ptr,
                        dx_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dinit_ptr,
                        L, H, G, P, N, n_chunks, heads_per_group,
                        HAS_DOC: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_h = tl.program_id(1)
        grp = pid_h // heads_per_group
        A = tl.load(A_ptr + pid_h)
        offs_q = tl.arange(0, Q)
        offs_p = tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        pn_offs = offs_p[:, None] * N + offs_n[None, :]
        pn_mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
        bh = pid_b * H + pid_h
        d_state = tl.load(dfinal_ptr + bh * P * N + pn_offs, mask=pn_mask, other=0.0)  # grad of the chunk's end state
        dA = 0.0
        for step in range(n_chunks):
            c = n_chunks - 1 - step
            doc_in = 0
            if HAS_DOC:
                doc_in = tl.load(doc_ptr + pid_b * L + tl.maximum(c * Q - 1, 0))
            x, dt, Bm, Cm, e, w, e_last, decay = _chunk_inputs(
                x_ptr, dt_ptr, B_ptr, C_ptr, doc_ptr, A, pid_b, pid_h, grp, c, doc_in,
                L, H, G, P, N, HAS_DOC, Q, BP, BN)
            t = c * Q + offs_q
            row = pid_b * L + t
            qp_offs = (row[:, None] * H + pid_h) * P + offs_p[None, :]
            qp_mask = (t[:, None] < L) & (offs_p[None, :] < P)
            dy = tl.load(dy_ptr + qp_offs, mask=qp_mask, other=0.0)
            state = tl.load(states_ptr + (bh * n_chunks + c) * P * N + pn_offs, mask=pn_mask, other=0.0)
            xdt = x * dt[:, None]
            CB = tl.dot(Cm, tl.trans(Bm), input_precision="ieee")
            # state_end = e_last * state + xdt^T (w B)
            d_xdt = tl.dot(Bm * w[:, None], tl.trans(d_state), input_precision="ieee")
            xdt_dS = tl.dot(xdt, d_state, input_precision="ieee")
            dB = xdt_dS * w[:, None]
            dw = tl.sum(xdt_dS * Bm, axis=1)
            d_e_last = tl.sum(tl.sum(state * d_state, axis=1), axis=0)
            d_state_in = e_last * d_state
            # y_off = e * (C state^T)
            d_state_in += tl.dot(tl.trans(dy), Cm * e[:, None], input_precision="ieee")
            dy_S = tl.dot(dy, state, input_precision="ieee")
            dC = dy_S * e[:, None]
            de = tl.sum(dy_S * Cm, axis=1)
            # y_diag = (CB * decay) xdt
            d_scores = tl.dot(dy, tl.trans(xdt), input_precision="ieee")
            d_xdt += tl.dot(tl.trans(CB * decay), dy, input_precision="ieee")
            dCB = d_scores * decay
            dC += tl.dot(dCB, Bm, input_precision="ieee")
            dB += tl.dot(tl.trans(dCB), Cm, input_precision="ieee")
            d_log_decay = d_scores * CB * decay
            d_cs = tl.sum(d_log_decay, axis=1) - tl.sum(d_log_decay, axis=0) + de * e - dw * w
            d_cs += tl.where(offs_q == Q - 1, tl.sum(dw * w, axis=0) + d_e_last * e_last, 0.0)
            d_dA = tl.cumsum(d_cs, axis=0, reverse=True)
            dA += tl.sum(d_dA * dt, axis=0)
            ddt = d_dA * A + tl.sum(d_xdt * x, axis=1)
            tl.store(dx_ptr + qp_offs, d_xdt * dt[:, None], mask=qp_mask)
            tl.store(ddt_ptr + row * H + pid_h, ddt, mask=t < L)
            qn_offs = (row[:, None] * H + pid_h) * N + offs_n[None, :]
            qn_mask = (t[:, None] < L) & (offs_n[None, :] < N)
            tl.store(dB_ptr + qn_offs, dB, mask=qn_mask)
            tl.store(dC_ptr + qn_offs, dC, mask=qn_mask)
            d_state = d_state_in
        tl.store(dinit_ptr + bh * P * N + pn_offs, d_state, mask=pn_mask)
        tl.store(dA_ptr + bh, dA)


def _blocks(chunk_size, p, n):
    """Tile sizes: tl.dot needs every dimension >= 16; chunks above 64 would spill registers."""
    return {"Q": min(max(triton.next_power_of_2(chunk_size), 16), 64), "BP": max(triton.next_power_of_2(p), 16),
            "BN": max(triton.next_power_of_2(n), 16)}


class SSDTritonFn(torch.autograd.Function):
    """y, final_state = SSD(x, dt, A, B, C, initial_state, doc) with processed fp32 dt; doc may be None."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, doc, chunk_size):
        b, l, h, p = x.shape
        g, n = B.shape[2:]
        blocks = _blocks(chunk_size, p, n)
        n_chunks = triton.cdiv(l, blocks["Q"])
        y = torch.empty_like(x)
        states = x.new_empty(b, h, n_chunks, p, n)
        final = x.new_empty(b, h, p, n)
        _ssd_fwd_kernel[(b, h)](x, dt, A, B, C, doc if doc is not None else x, initial_state, y, states, final,
                                l, h, g, p, n, n_chunks, h // g, HAS_DOC=doc is not None, HAS_INIT=True, **blocks)
        ctx.save_for_backward(x, dt, A, B, C, doc, states)
        ctx.blocks = blocks
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, doc, states = ctx.saved_tensors
        b, l, h, p = x.shape
        g, n = B.shape[2:]
        dy = dy.contiguous() if dy is not None else torch.zeros_like(x)
        dfinal = dfinal.contiguous() if dfinal is not None else x.new_zeros(b, h, p, n)
        dx, ddt = torch.empty_like(x), torch.empty_like(dt)
        dA = x.new_empty(b, h)
        dB, dC = x.new_empty(b, l, h, n), x.new_empty(b, l, h, n)  # per head; summed over each group below
        dinit = torch.empty_like(dfinal)
        _ssd_bwd_kernel[(b, h)](x, dt, A, B, C, doc if doc is not None else x, states, dy, dfinal,
                                dx, ddt, dA, dB, dC, dinit, l, h, g, p, n, states.shape[2], h // g,
                                HAS_DOC=doc is not None, **ctx.blocks)
        dB, dC = (t.view(b, l, g, h // g, n).sum(3) for t in (dB, dC))
        return dx, ddt, dA.sum(0), dB, dC, dinit, None, None


def ssd_triton(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
               dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False):
    if triton is None:
        raise ValueError("the triton kernel backend needs the triton package; pip install triton or set "
                         "DISTILL_KERNELS=torch")
    check_ssd_shapes(x, dt, A, B, C, D, z, initial_states, seq_idx)
    if not x.shape[1]:
        return empty_scan(x, B, initial_states, return_final_states)
    b, h, p, n = x.shape[0], x.shape[2], x.shape[3], B.shape[3]
    f = torch.float32
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, f).contiguous()
    initial = x.new_zeros(b, h, p, n, dtype=f) if initial_states is None else initial_states.to(f).contiguous()
    doc = document_index(seq_idx).contiguous() if seq_idx is not None else None
    xf = x.to(f).contiguous()
    y, final = SSDTritonFn.apply(xf, dt, A.to(f).contiguous(), B.to(f).contiguous(), C.to(f).contiguous(),
                                 initial, doc, chunk_size)
    y = skip_and_gate(y, xf, D, z).to(x.dtype)
    return (y, final.to(x.dtype)) if return_final_states else y
