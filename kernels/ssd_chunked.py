"""Mamba-2 (SSD) scan in chunks with PyTorch ops: the fast path on CPU and any device without Triton.

The sequence is cut into chunks of Q positions (the algorithm of Mamba-2's `ssd_minimal`):

1. inside a chunk the scan is a masked, decayed attention: y_i = sum_j (C_i . B_j) exp(cs_i - cs_j) dt_j x_j,
   with cs the cumulative sum of dt * A inside the chunk;
2. each chunk's contribution to the state at its end is a (p, n) matrix;
3. a short loop over chunks carries the state from chunk to chunk;
4. every position reads its chunk's incoming state: y_i += exp(cs_i) C_i . state.

Two ways to apply the decays, chosen per head, with identical results:

- factored (`ssd_factored`, the usual case): exp(cs_i - cs_j) = exp(cs_i - m) exp(m - cs_j), with m the middle of
  the chunk's range of cs. The input side folds into dt_j x_j once, the output side scales y_i once, and what is
  left is one (Q, Q) mask C B^T per chunk and group, shared by all its heads: every step is a GEMM over all r * p
  head channels of a group. It needs every exponent to stay far from overflow, so a head takes it when each of
  its chunks' cs spans less than -(log(tiny) + 20): then none of its decays is small enough to be flushed (below)
  and the factors stay within e^+-34 (e^+-344 in float64).
- pairwise (`ssd_pairwise`, heads with a chunk whose decays span more, e.g. large dt * |A| at a large Q): the
  per-head (Q, Q) decays exp(cs_i - cs_j) are built explicitly, in blocks of BLOCK_CHUNKS chunks so they stay
  cache-sized; decays below log(tiny) + 20 are flushed to zero.

The factored path goes in blocks of BLOCK_CHUNKS chunks whose intermediates live in a per-thread workspace,
reused from block to block and from call to call (like a BLAS workspace) and updated in place: a fresh full-size
intermediate is page-faulted in, which costs about as much as the GEMMs on it. With autograd the blocks are one
node (`FactoredScan`) that keeps only what its hand-written backward reads (the pre-decay output Z and the carried
states, besides the inputs); the backward goes back through the same blocks with the same workspace. Autograd
itself sees only the (b, l, h)-sized decay factors and the (Q, Q) scores. With and without autograd the forward
runs the same ops in the same order, so they give the same bits.

All of it runs in fp32 (float64 for float64 inputs) and uses O(L * Q) memory. Documents packed into a row
(`seq_idx`) become a document counter; every decay between two different documents is masked to zero, which
is exactly the reset of the sequential definition in `ssd_naive`.
"""

import math
import threading

import torch
import torch.nn.functional as F

from .common import check_ssd_shapes, compute_dtype, document_index, empty_scan, process_dt, skip_and_gate
from .state_passing import StatePassing, pass_states_

# Tuned on a 2-core x86 CPU with scripts/bench_kernels.py --tune (fp32, h=16, p=64, n=64): 64 is the fastest
# forward and forward+backward of 32 / 64 / 128 / 256 (larger chunks also send fast-decaying heads pairwise).
# The dispatcher's mamba_chunk_scan_combined runs this path at this chunk size whatever its caller passes.
DEFAULT_CHUNK_SIZE = 64
BLOCK_CHUNKS = 8
_workspace = threading.local()  # the no-grad forward's block buffers, kept between calls on this thread


def decay_exp(log_decay, mask=None):
    """exp of log-decays, zero where masked out or below log(tiny) + 20.

    The flush keeps subnormal floats (~100x slower on x86, and what GPUs flush anyway) out of the matmuls;
    a decay under e^-67 in fp32 (e^-688 in float64) is far below the resolution of any sum it enters.
    """
    keep = log_decay >= flush_log(log_decay.dtype)
    if mask is not None:
        keep = keep & mask
    return torch.where(keep, log_decay, -math.inf).exp_()


def flush_log(dtype):
    """Log-decays below this are flushed to zero (see decay_exp)."""
    return math.log(torch.finfo(dtype).tiny) + 20


@torch.autocast("cpu", enabled=False)
@torch.autocast("cuda", enabled=False)
def ssd_chunked(x, dt, A, B, C, chunk_size=DEFAULT_CHUNK_SIZE, D=None, z=None, dt_bias=None, initial_states=None,
                seq_idx=None, dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False):
    """mamba_chunk_scan_combined's contract: factored decays for the heads whose chunks all allow them, pairwise
    decays for the others. Autocast is off inside: the scan computes in fp32 whatever the caller's autocast."""
    check_ssd_shapes(x, dt, A, B, C, D, z, initial_states, seq_idx)
    if not x.shape[1]:
        return empty_scan(x, B, initial_states, return_final_states)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    f = compute_dtype(x.dtype)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, f)
    A, B, C = A.to(f), B.to(f), C.to(f)  # x is not cast: the first op on it computes in f
    doc = document_index(seq_idx) if seq_idx is not None else None
    state = None if initial_states is None else initial_states.to(f)  # None: zeros
    # Without autograd the factored path goes in blocks that reuse buffers and write y in place.
    inplace = not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, initial_states)))

    Q = chunk_size
    c = -(-l // Q)
    # Padding at the end has dt = 0: it adds nothing to the state and does not decay it.
    cs = F.pad(dt * A, (0, 0, 0, c * Q - l)).view(b, c, Q, h).cumsum(2)  # (b, c, Q, h)
    with torch.no_grad():  # the range of exponents in each chunk, 0 (the chunk's start) included
        hi, lo = cs.amax(2).clamp_min(0), cs.amin(2).clamp_max(0)  # (b, c, h)
        wide = (hi - lo > -flush_log(f)).flatten(0, 1).any(0)  # (h,): heads with a chunk that needs pairwise decays
    pairwise = wide.nonzero()[:, 0].tolist()
    if pairwise and state is None:
        state = x.new_zeros(b, h, p, n, dtype=f)
    if len(pairwise) == h:
        y, state = ssd_pairwise(x, dt, A, B, C, state, doc, chunk_size)
        y = skip_and_gate(y, x, D, z).to(x.dtype)
    else:
        # The factored path runs on every head (keeping the group GEMMs whole) with no decay at all in the wide
        # heads, which keeps them finite; their output and state are then replaced by the pairwise path's.
        ref = (hi + lo) / 2
        if pairwise:
            cs, ref = cs.masked_fill(wide, 0), ref.masked_fill(wide, 0)
        y, final = ssd_factored(x, dt, B, C, cs, ref, state, doc, D, z, inplace)
        if pairwise:
            heads = torch.tensor(pairwise, device=x.device)
            groups = heads // (h // g)
            y_wide, state_wide = ssd_pairwise(x[:, :, heads], dt[:, :, heads], A[heads], B[:, :, groups],
                                              C[:, :, groups], state[:, heads], doc, chunk_size)
            y_wide = skip_and_gate(y_wide, x[:, :, heads], None if D is None else D[heads],
                                   None if z is None else z[:, :, heads]).to(x.dtype)
            y = y.index_copy_(2, heads, y_wide) if inplace else y.index_copy(2, heads, y_wide)
            final = final.index_copy(1, heads, state_wide)
        state = final
    return (y, state.to(x.dtype)) if return_final_states else y


def pad_to(t, length):
    """t padded with zeros along dim 1 to `length` (no copy when it already has that length)."""
    pad = length - t.shape[1]
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t


def chunk_documents(doc, c, Q):
    """Per chunk: the document of every position (b, c, Q), of the chunk's last position (b, c) and of the
    state coming into the chunk (b, c); the end padding belongs to the last document."""
    b, l = doc.shape
    doc = torch.cat([doc, doc[:, -1:].expand(b, c * Q - l)], dim=1).view(b, c, Q)
    doc_end = doc[..., -1]
    doc_in = torch.cat([doc[:, :1, 0], doc_end[:, :-1]], dim=1)
    return doc, doc_end, doc_in


def scratch(work, name, shape, like):
    """A contiguous buffer of this shape kept in `work` (per name, device and dtype, grown when too small) and
    reused from block to block and call to call."""
    numel, key = math.prod(shape), (name, like.device, like.dtype)
    if key not in work or work[key].numel() < numel:
        work[key] = like.new_empty(numel)
    return work[key][:numel].view(shape)


def carried(state, doc, start):
    """The state carried into a block that starts at position `start`: zero in the rows where a document starts
    exactly there (it must not see the previous document's state)."""
    if doc is None or not start:
        return state
    return state * (doc[:, start] == doc[:, start - 1]).to(state.dtype)[:, None, None, None]


def ssd_factored(x, dt, B, C, cs, ref, state, doc, D, z, inplace):
    """The chunked scan with factored decays: y (b, l, h, p) in x's dtype, epilogue (D, z) included, and the
    final state. cs (b, c, Q, h) is the in-chunk cumsum of dt * A, ref (b, c, h) the middle of its range (a
    constant that cancels: exp(cs_i - cs_j) = exp(cs_i - ref) exp(ref - cs_j)); doc is the document counter or None;
    state is the initial state, or None for zeros.

    What the heads share (the chunks' C.B scores, the document masks, the carry factors) is computed once for the
    whole sequence, by autograd ops on (b, l, h)-sized tensors. The (b, l, h, p)-sized work goes in blocks of
    BLOCK_CHUNKS chunks (`factored_blocks`); with autograd it is one node, `FactoredScan`, whose backward is
    written by hand and also goes in blocks. Both run the same forward ops in the same order, so they give the
    same bits.
    """
    b, _, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    f = cs.dtype
    x_scale, out_scale, w, u_last = chunk_factors(dt, cs, ref)
    scores, B_end, C_in, same_doc = chunk_operands(B, C, doc, c=cs.shape[1], Q=cs.shape[2])
    carry = w if same_doc is None else w * same_doc
    T0 = None if state is None else state.view(b, g, r, p, n).permute(0, 1, 4, 2, 3)  # (b, g, n, r, p)
    if inplace:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        # silu of the whole z, as under autograd: silu's vectorized and scalar tails differ in the last bit
        gate = None if z is None else F.silu(z.to(f))
        T = factored_blocks(x, x_scale, out_scale, w, carry, scores, B_end, C_in, T0, D, gate, y)
    else:
        y, T = FactoredScan.apply(x, x_scale, out_scale, w, carry, scores, B_end, C_in, T0, D,
                                  x.dtype if z is None else f)
        if z is not None:
            y = (y * F.silu(z.to(f))).to(x.dtype)
    if not inplace:
        return y, (T * u_last.view(b, g, 1, r, 1)).permute(0, 1, 3, 4, 2).reshape(b, h, p, n)
    final = torch.empty(b, h, p, n, dtype=f, device=x.device)
    torch.mul(T, u_last.view(b, g, 1, r, 1), out=final.view(b, g, r, p, n).permute(0, 1, 4, 2, 3))  # one write
    return y, final


def chunk_factors(dt, cs, ref):
    """The factored decays of each chunk k, in fp32 (b, c, ...), with e_k = cs at the chunk's end.

    Inside a chunk: x_scale = dt_j exp(ref - cs_j) goes into the input, out_scale = exp(cs_i - ref) onto the output.
    Across chunks the true state_{k+1} = exp(e_k) state_k + exp(e_k - ref_k) S_k, with S_k = B^T X the chunk's GEMM.
    Carrying T_k = state_k / exp(e_{k-1} - ref_{k-1}) instead (T_0 = state_0) turns that into one multiply-add,
    T_{k+1} = S_k + w_k T_k with w_k = exp(ref_k + e_{k-1} - ref_{k-1}), and chunk k's output reads
    w_k T_k = exp(ref_k) state_k; the final state is u_last T_c with u_last = exp(e - ref) of the last chunk.
    Every exponent is within the factored path's bound on the chunk's span, so nothing overflows.
    """
    b, c, Q, h = cs.shape
    ref = ref[:, :, None]
    x_scale = pad_to(dt, c * Q).view(b, c, Q, h) * (ref - cs).exp()
    out_scale = (cs - ref).exp()
    to_end = cs[:, :, -1] - ref[:, :, 0]  # (b, c, h): e_k - ref_k
    w = (ref[:, :, 0] + F.pad(to_end[:, :-1], (0, 0, 1, 0))).exp()
    return x_scale, out_scale, w, to_end[:, -1].exp()


def chunk_operands(B, C, doc, c, Q):
    """What a chunk's GEMMs read besides x, shared by the heads of a group, for the whole sequence: the in-chunk
    scores C.B^T (b, c, g, Q, Q), causal and within one document; B (b, c, g, Q, n) of the positions that reach the
    chunk's end (those in its last document); C (b, c, g, Q, n) of the positions that read its incoming state (those
    in that state's document); and whether the incoming state's document reaches the chunk's end (b, c, 1), None
    without documents. Being per chunk of the whole sequence, the masks also reset the state where a document
    starts at a block boundary."""
    b, _, g, n = B.shape
    Bc, Cc = (pad_to(t, c * Q).view(b, c, Q, g, n).transpose(2, 3) for t in (B, C))  # (b, c, g, Q, n)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=B.device).tril()
    if doc is None:
        return (Cc @ Bc.mT).masked_fill_(~causal, 0), Bc.contiguous(), Cc.contiguous(), None
    doc, doc_end, doc_in = chunk_documents(doc, c, Q)
    keep = causal & (doc[..., :, None] == doc[..., None, :])[:, :, None]
    to_end = (doc == doc_end[..., None])[:, :, None, :, None]
    from_start = (doc == doc_in[..., None])[:, :, None, :, None]
    return (Cc @ Bc.mT).masked_fill_(~keep, 0), Bc * to_end, Cc * from_start, (doc_end == doc_in)[..., None]


def to_groups(t, rows, m, Q, g, out):
    """Rows `rows` of t (b, l, h, p), zero-padded to m chunks of Q, as (b, m, g, Q, r, p) in out's dtype: the
    layout of the group GEMMs, in which a group's heads are one (Q, r * p) matrix. A view of t where it already
    is that (fp32, one group, whole chunks), else one copy into `out` (the cast of bf16 inputs, in cache)."""
    b, _, h, p = t.shape
    t = t[:, rows]
    if t.shape[1] < m * Q:
        t = pad_to(t, m * Q)
    t = t.reshape(b, m, Q, g, h // g, p).transpose(2, 3)
    return t if g == 1 and t.dtype == out.dtype else out.copy_(t)


def from_groups(src, dst, rows):
    """src (b, m, g, Q, r, p) written into rows `rows` of dst (b, l, h, p) (the last block's padding left out)."""
    b, m, g, Q, r, p = src.shape
    dst = dst[:, rows]
    if dst.shape[1] == m * Q:
        dst.view(b, m, Q, g, r, p).copy_(src.transpose(2, 3))
    else:
        dst.copy_(src.transpose(2, 3).reshape(b, m * Q, g * r, p)[:, :dst.shape[1]])


def per_group(t, g):
    """A per-position, per-head factor (b, m, Q, h) as (b, m, g, Q, r, 1), to scale (b, m, g, Q, r, p)."""
    b, m, Q, h = t.shape
    return t.view(b, m, Q, g, h // g, 1).transpose(2, 3)


def skip_weight(D, g, f):
    """D (h,) or (h, p) as (g, 1, r, 1 or p), to scale (b, m, g, Q, r, p)."""
    return D.to(f).view(g, 1, -1, 1 if D.dim() == 1 else D.shape[1])


def factored_blocks(x, x_scale, out_scale, w, carry, scores, B_end, C_in, T0, D, gate, y, Z=None, T=None):
    """ssd_factored's (b, l, h, p)-sized work, in blocks of BLOCK_CHUNKS chunks: y = D x + out_scale Z written
    into y (times `gate`, silu(z) in fp32, when given), with Z = scores X + C_in (w T) and X = x_scale x per chunk.
    Returns the carried T after the last chunk, (b, g, n, r, p).

    Without Z and T, every intermediate lives in the thread's workspace (a fresh full-size one is page-faulted in,
    which costs about as much as the GEMMs on it) and is overwritten by the next block. FactoredScan passes
    full-size Z (b, c, g, Q, r * p) and T (b, c + 1, g, n, r * p), which its backward reads: T holds T_0 .. T_c.
    """
    b, _, h, p = x.shape
    _, c, g, Q, n = B_end.shape
    r = h // g
    f = x_scale.dtype
    work = _workspace.__dict__
    if T is None:  # slot 0 holds the T coming into a block, copied there from the previous block's last slot
        T = scratch(work, "states", (b, min(c, BLOCK_CHUNKS) + 1, g, n, r * p), x_scale)
    if T0 is None:
        T[:, 0].zero_()
    else:
        T[:, 0].view(b, g, n, r, p).copy_(T0)
    Dw = None if D is None else skip_weight(D, g, f)
    for k in range(0, c, BLOCK_CHUNKS):
        m = min(BLOCK_CHUNKS, c - k)
        rows, chunks = slice(k * Q, (k + m) * Q), slice(k, k + m)
        if Z is None:
            if k:
                T[:, 0].copy_(T[:, BLOCK_CHUNKS])
            slots, Zb = T[:, :m + 1], scratch(work, "Z", (b, m, g, Q, r * p), x_scale)
        else:
            slots, Zb = T[:, k:k + m + 1], Z[:, chunks]
        block = (b, m, g, Q, r, p)
        xb = to_groups(x, rows, m, Q, g, scratch(work, "x", block, x_scale))
        X = torch.mul(xb, per_group(x_scale[:, chunks], g), out=scratch(work, "X", block, x_scale))
        for i in range(b):
            # 1. Within each chunk: the group's causal C.B mask applied to all its heads.
            torch.bmm(scores[i, chunks].reshape(m * g, Q, Q), X[i].view(m * g, Q, r * p),
                      out=Zb[i].view(m * g, Q, r * p))
            # 2. Each chunk's contribution to the carried state goes to slots 1..m.
            torch.matmul(B_end[i, chunks].mT, X[i].view(m, g, Q, r * p), out=slots[i, 1:])
        # 3. Carry T: slot j becomes T_{k + j}; chunk j reads w_j T_j.
        pass_states_(slots.view(b, m + 1, g, n, r, p).movedim(1, 0),
                     carry[:, chunks].movedim(1, 0).view(m, b, g, 1, r, 1))
        V = torch.mul(slots[:, :m].view(b, m, g, n, r, p), w[:, chunks].view(b, m, g, 1, r, 1),
                      out=scratch(work, "V", (b, m, g, n, r, p), x_scale))
        # 4. Every position reads its chunk's incoming state; then the output-side decay, D x and the gate.
        for i in range(b):
            Zb[i].view(m * g, Q, r * p).baddbmm_(C_in[i, chunks].reshape(m * g, Q, n), V[i].view(m * g, n, r * p))
        yb = torch.mul(Zb.view(b, m, g, Q, r, p), per_group(out_scale[:, chunks], g),
                       out=scratch(work, "y", block, x_scale))
        if Dw is not None:
            yb.addcmul_(xb, Dw)
        if gate is not None:
            yb.mul_(to_groups(gate, rows, m, Q, g, scratch(work, "gate", block, x_scale)))
        from_groups(yb, y, rows)
    return slots[:, m].view(b, g, n, r, p)


class FactoredScan(torch.autograd.Function):
    """factored_blocks as one autograd node: (x, x_scale, out_scale, w, carry, scores, B_end, C_in, T0, D) ->
    (y, T after the last chunk), y (b, l, h, p) in `dtype`, D x included.

    The backward reuses the forward's Z and T and goes in reverse blocks of BLOCK_CHUNKS chunks, its
    intermediates in the thread's workspace, instead of autograd's graph of full-size elementwise ops and their
    saved copies. With Z = scores X + C_in V, V_k = w_k T_k, T_{k+1} = S_k + carry_k T_k, S_k = B_end^T X_k and
    y = D x + out_scale Z, for the output gradient dy:
      dZ = out_scale dy,   d out_scale = sum_p dy Z,   dD = sum dy x,
      dscores = dZ X^T,    dC_in = dZ V^T,             dV = C_in^T dZ,   dw_k = sum_(n, p) dV_k T_k,
      G_k = dL/dT_k = carry_k G_(k+1) + w_k dV_k (G_c: the final T's gradient),   dS_k = G_(k+1),
      dcarry_k = sum_(n, p) G_(k+1) T_k,   dB_end = X dS^T,   dX = scores^T dZ + B_end dS,
      dx = x_scale dX + D dy,              d x_scale = sum_p dX x.
    """

    @staticmethod
    def forward(ctx, x, x_scale, out_scale, w, carry, scores, B_end, C_in, T0, D, dtype):
        b, _, h, p = x.shape
        _, c, g, Q, n = B_end.shape
        f = x_scale.dtype
        Z = torch.empty(b, c, g, Q, h // g * p, dtype=f, device=x.device)
        T = torch.empty(b, c + 1, g, n, h // g * p, dtype=f, device=x.device)
        y = torch.empty(x.shape, dtype=dtype, device=x.device)
        T_last = factored_blocks(x, x_scale, out_scale, w, carry, scores, B_end, C_in, T0, D, None, y, Z, T)
        ctx.save_for_backward(x, x_scale, out_scale, w, carry, scores, B_end, C_in, D, Z, T)
        ctx.has_T0 = T0 is not None
        return y, T_last.clone()

    @staticmethod
    def backward(ctx, dy, dT_last):
        x, x_scale, out_scale, w, carry, scores, B_end, C_in, D, Z, T = ctx.saved_tensors
        b, _, h, p = x.shape
        _, c, g, Q, n = B_end.shape
        r, f = h // g, x_scale.dtype
        work = _workspace.__dict__
        dx, d_x_scale, d_out_scale, dw, dcarry, dscores, dB_end, dC_in = (
            torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (x, x_scale, out_scale, w, carry, scores, B_end, C_in))
        dD = None if D is None else torch.zeros(g, r, p, dtype=f, device=x.device)
        Dw = None if D is None else skip_weight(D, g, f)
        # G_k in slots 0..m of the block (slot m: the G coming in from the block after, or the final T's)
        G = scratch(work, "grad_states", (b, min(c, BLOCK_CHUNKS) + 1, g, n, r * p), x_scale)
        starts = list(range(0, c, BLOCK_CHUNKS))
        for k in reversed(starts):
            m = min(BLOCK_CHUNKS, c - k)
            rows, chunks = slice(k * Q, (k + m) * Q), slice(k, k + m)
            block = (b, m, g, Q, r, p)
            if k == starts[-1]:
                G[:, m].view(b, g, n, r, p).copy_(dT_last)
            else:
                G[:, m].copy_(G[:, 0])
            xb = to_groups(x, rows, m, Q, g, scratch(work, "x", block, x_scale))
            dyb = to_groups(dy, rows, m, Q, g, scratch(work, "dy", block, x_scale))
            tmp = scratch(work, "tmp", block, x_scale)
            torch.mul(dyb, Z[:, chunks].view(b, m, g, Q, r, p), out=tmp)
            per_group(d_out_scale[:, chunks], g)[..., 0].copy_(tmp.sum(-1))
            if dD is not None:
                dD += torch.mul(dyb, xb, out=tmp).sum((0, 1, 3))
            dZ = torch.mul(dyb, per_group(out_scale[:, chunks], g), out=scratch(work, "dZ", block, x_scale))
            X = torch.mul(xb, per_group(x_scale[:, chunks], g), out=scratch(work, "X", block, x_scale))
            states = T[:, k:k + m].view(b, m, g, n, r, p)
            dV = scratch(work, "dV", (b, m, g, n, r, p), x_scale)
            for i in range(b):
                torch.bmm(C_in[i, chunks].reshape(m * g, Q, n).mT, dZ[i].view(m * g, Q, r * p),
                          out=dV[i].view(m * g, n, r * p))
            state_tmp = scratch(work, "state_tmp", (b, m, g, n, r, p), x_scale)
            dw[:, chunks].view(b, m, g, r).copy_(torch.mul(dV, states, out=state_tmp).sum((3, 5)))
            dV.mul_(w[:, chunks].view(b, m, g, 1, r, 1))
            Gb = G[:, :m + 1].view(b, m + 1, g, n, r, p)
            carry_b = carry[:, chunks].view(b, m, g, 1, r, 1)
            for j in reversed(range(m)):
                torch.addcmul(dV[:, j], Gb[:, j + 1], carry_b[:, j], out=Gb[:, j])
            dS = G[:, 1:m + 1]
            dcarry[:, chunks].view(b, m, g, r).copy_(
                torch.mul(Gb[:, 1:], states, out=state_tmp).sum((3, 5)))
            V = torch.mul(states, w[:, chunks].view(b, m, g, 1, r, 1), out=state_tmp)
            dX = scratch(work, "dX", block, x_scale)
            for i in range(b):
                dZ_i, X_i, dS_i = (t[i].reshape(m * g, -1, r * p) for t in (dZ, X, dS))
                torch.bmm(scores[i, chunks].reshape(m * g, Q, Q).mT, dZ_i, out=dX[i].view(m * g, Q, r * p))
                dX[i].view(m * g, Q, r * p).baddbmm_(B_end[i, chunks].reshape(m * g, Q, n), dS_i)
                torch.bmm(dZ_i, X_i.mT, out=dscores[i, chunks].view(m * g, Q, Q))
                torch.bmm(dZ_i, V[i].view(m * g, n, r * p).mT, out=dC_in[i, chunks].view(m * g, Q, n))
                torch.bmm(X_i, dS_i.mT, out=dB_end[i, chunks].view(m * g, Q, n))
            per_group(d_x_scale[:, chunks], g)[..., 0].copy_(torch.mul(dX, xb, out=tmp).sum(-1))
            dX.mul_(per_group(x_scale[:, chunks], g))
            if Dw is not None:
                dX.addcmul_(dyb, Dw)
            from_groups(dX, dx, rows)
        dT0 = G[:, 0].view(b, g, n, r, p).clone() if ctx.has_T0 else None
        if dD is not None:
            dD = dD.view(h, p).sum(1) if D.dim() == 1 else dD.view(h, p)
        return dx, d_x_scale, d_out_scale, dw, dcarry, dscores, dB_end, dC_in, dT0, dD, None


def ssd_pairwise(x, dt, A, B, C, state, doc, chunk_size):
    """The chunked scan with explicit per-head pairwise decays, in blocks of BLOCK_CHUNKS chunks (the state
    carried between blocks), so the (b, h, positions, Q) intermediates stay cache-sized."""
    l = x.shape[1]
    xdt = x * dt[..., None]
    block = chunk_size * BLOCK_CHUNKS
    # split, not slicing: its backward concatenates the block gradients once instead of padding each to full size
    pieces = zip(*(t.split(block, dim=1) for t in (xdt, dt, B, C)))
    ys = []
    for start, (block_xdt, block_dt, block_B, block_C) in zip(range(0, l, block), pieces):
        block_doc = None if doc is None else doc[:, start:start + block]
        y, state = ssd_block(block_xdt, block_dt, A, block_B, block_C, carried(state, doc, start), block_doc,
                             chunk_size)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def ssd_block(xdt, dt, A, B, C, initial_state, doc, chunk_size):
    """The chunked scan of one block: y (b, l, h, p) without the D / z epilogue, and the final state.

    xdt = x * dt and dt are processed, everything is in the compute dtype; doc is the document counter or None,
    and the initial state belongs to the block's first document.
    """
    b, l, h, p = xdt.shape
    g, n = B.shape[2:]
    r = h // g
    Q = chunk_size
    pad = (-l) % Q
    c = (l + pad) // Q
    # Padding at the end has dt = 0: it adds nothing to the state and does not decay it.
    xdt, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xdt, dt, B, C))

    # Groups first: the heads of a group share B and C, so the state matmuls are batched over (b, g, c)
    # with all r * p head channels in one GEMM. For g = 1 these are views of the inputs.
    X = xdt.view(b, c, Q, g, r, p).permute(0, 3, 1, 2, 4, 5)  # (b, g, c, Q, r, p)
    Bc = B.view(b, c, Q, g, n).permute(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    Cc = C.view(b, c, Q, g, n).permute(0, 3, 1, 2, 4)
    dA_cs = (dt.view(b, c, Q, g, r).permute(0, 3, 1, 4, 2) * A.view(g, r, 1)[:, None]).cumsum(-1)  # (b, g, c, r, Q)

    causal = torch.ones(Q, Q, dtype=torch.bool, device=xdt.device).tril()
    if doc is not None:
        # (b, 1, c, 1, Q) and (b, 1, c, 1): broadcast over groups and heads
        doc, doc_end, doc_in = (t.unsqueeze(1).unsqueeze(3) for t in chunk_documents(doc, c, Q))
        causal = causal & (doc[..., :, None] == doc[..., None, :])

    # 1. Within each chunk: decayed, causally masked C.B scores (per head) applied to dt * x.
    decay = decay_exp(dA_cs[..., :, None] - dA_cs[..., None, :], causal)  # (b, g, c, r, Q, Q)
    scores = decay * (Cc @ Bc.mT)[:, :, :, None]
    Y = (scores @ X.transpose(3, 4)).transpose(3, 4)  # (b, g, c, Q, r, p)

    # 2. Each chunk's contribution to the state at its end.
    to_end = decay_exp(dA_cs[..., -1:] - dA_cs)  # (b, g, c, r, Q)
    chunk_decay = decay_exp(dA_cs[..., -1])  # (b, g, c, r)
    from_start = decay_exp(dA_cs)
    if doc is not None:
        to_end = to_end * (doc == doc_end[..., None])
        chunk_decay = chunk_decay * (doc_end == doc_in)
        from_start = from_start * (doc == doc_in[..., None])
    X_to_end = (X * to_end.transpose(3, 4)[..., None]).reshape(b, g, c, Q, r * p)
    chunk_states = (X_to_end.mT @ Bc).view(b, g, c, r, p, n)

    # 3. Carry the state across chunks.
    incoming, state = StatePassing.apply(chunk_states.movedim(2, 0), chunk_decay.movedim(2, 0)[..., None, None],
                                         initial_state.reshape(b, g, r, p, n))
    incoming = incoming.movedim(0, 2)

    # 4. Every position reads its chunk's incoming state.
    Y_off = (Cc @ incoming.view(b, g, c, r * p, n).mT).view(b, g, c, Q, r, p)
    Y = Y + Y_off * from_start.transpose(3, 4)[..., None]

    y = Y.permute(0, 2, 3, 1, 4, 5).reshape(b, c * Q, h, p)[:, :l]
    return y, state.view(b, h, p, n)
