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

Without autograd the factored path goes in blocks of BLOCK_CHUNKS chunks whose intermediates live in a
per-thread workspace, reused from block to block and from call to call (like a BLAS workspace) and updated in
place: a fresh full-size intermediate is page-faulted in, which costs about as much as the GEMMs on it. Each block
reads its input once (D x starts the output off) and writes its output once. With autograd it is one block (the
backward keeps every intermediate anyway). Both run the same ops in the same order, so they give the same bits.

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
    whole sequence. With autograd every intermediate is kept for the backward, so the sequence is one block
    (`factored_block`). Without (inplace), it goes in blocks of BLOCK_CHUNKS chunks (`factored_block_`) that reuse
    the thread's workspace and write their part of y directly. Both do the same ops in the same order, carrying the
    same T from chunk to chunk and from block to block, so their results are bit-identical.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    c, Q = cs.shape[1:3]
    x_scale, out_scale, w, u_last = chunk_factors(dt, cs, ref)
    scores, B_end, C_in, same_doc = chunk_operands(B, C, doc, c, Q)
    carry = w if same_doc is None else w * same_doc
    # (b, g, n, r, p): the layout of the GEMMs
    T = None if state is None else state.view(b, g, r, p, n).permute(0, 1, 4, 2, 3)
    u_last = u_last.view(b, g, 1, r, 1)
    if not inplace:
        T = x_scale.new_zeros(b, g, n, r, p) if T is None else T
        y, T = factored_block(x, x_scale, out_scale, w, carry, scores, B_end, C_in, T, D)
        y = skip_and_gate(y[:, :l], x, None, z).to(x.dtype)
        return y, (T * u_last).permute(0, 1, 3, 4, 2).reshape(b, h, p, n)

    work = _workspace.__dict__
    # The carried states of each batch row are one buffer, slot k + 1 right after slot k (pass_states_): slot 0
    # holds the T coming into a block, copied there from the previous block's last slot.
    slots = scratch(work, "states", (b, min(c, BLOCK_CHUNKS) + 1, g, n, r * p), x_scale)
    if T is None:
        slots[:, 0].zero_()
    else:
        slots[:, 0].view(b, g, n, r, p).copy_(T)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # silu of the whole z as in skip_and_gate: silu's vectorized and scalar tails differ in the last bit
    gate = None if z is None else F.silu(z.to(x_scale.dtype))
    for k in range(0, c, BLOCK_CHUNKS):
        m = min(BLOCK_CHUNKS, c - k)
        if k:
            slots[:, 0].copy_(slots[:, BLOCK_CHUNKS])
        rows, chunks = slice(k * Q, (k + m) * Q), slice(k, k + m)
        factored_block_(x[:, rows], x_scale[:, chunks], out_scale[:, chunks], w[:, chunks], carry[:, chunks],
                        scores[:, chunks], B_end[:, chunks], C_in[:, chunks], D,
                        None if gate is None else gate[:, rows], work, slots[:, :m + 1], y[:, rows])
    final = torch.empty(b, h, p, n, dtype=x_scale.dtype, device=x.device)
    T = slots[:, m].view(b, g, n, r, p)
    torch.mul(T, u_last, out=final.view(b, g, r, p, n).permute(0, 1, 4, 2, 3))  # the transpose written once
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
        return (Cc @ Bc.mT).masked_fill_(~causal, 0), Bc, Cc, None
    doc, doc_end, doc_in = chunk_documents(doc, c, Q)
    keep = causal & (doc[..., :, None] == doc[..., None, :])[:, :, None]
    to_end = (doc == doc_end[..., None])[:, :, None, :, None]
    from_start = (doc == doc_in[..., None])[:, :, None, :, None]
    return (Cc @ Bc.mT).masked_fill_(~keep, 0), Bc * to_end, Cc * from_start, (doc_end == doc_in)[..., None]


def skip_start(x, out_scale, D, out=None):
    """D x divided by the output-side decay, (b, c, g, Q, r, p) like x: Y starts from it, so that the final
    multiplication by out_scale adds D x (and the input is read while it is in cache, for the GEMMs' X)."""
    b, c, g, Q, r, p = x.shape
    skip = out_scale.reciprocal().view(b, c, Q, g, r, 1).transpose(2, 3)
    if D.dim() == 1:
        return torch.mul(x, skip * D.to(skip.dtype).view(g, 1, r, 1), out=out)
    y = torch.mul(x, skip, out=out)
    D = D.to(skip.dtype).view(g, 1, r, p)
    return y.mul_(D) if out is not None else y * D


def factored_block(x, x_scale, out_scale, w, carry, scores, B_end, C_in, T, D):
    """ssd_factored under autograd, the whole sequence at once: y (b, c * Q, h, p) in fp32 with D x but without the
    gate, and the carried T after the last chunk. Batch-major, (b, c, group, ...); the carry is one autograd node."""
    b, _, h, p = x.shape
    _, c, g, Q, n = B_end.shape
    r = h // g
    # dt and the input-side decay folded into x once, grouped so that a group's heads are one (Q, r * p) matrix
    x = pad_to(x, c * Q).view(b, c, Q, g, r, p).transpose(2, 3)  # (b, c, g, Q, r, p)
    X = (x * x_scale.view(b, c, Q, g, r, 1).transpose(2, 3)).reshape(b * c * g, Q, r * p)
    # 1. Within each chunk: the group's causal C.B mask applied to all its heads.
    scores = scores.reshape(b * c * g, Q, Q)
    Y = scores @ X if D is None else torch.baddbmm(skip_start(x, out_scale, D).reshape(b * c * g, Q, r * p), scores, X)
    # 2. Each chunk's contribution to the carried state, in a (n, r, p) layout that the GEMMs read directly.
    S = B_end.mT @ X.view(b, c, g, Q, r * p)  # (b, c, g, n, r * p)
    # 3. Carry T across chunks (chunk_factors).
    T, T_last = StatePassing.apply(S.view(b, c, g, n, r, p).movedim(1, 0), carry.movedim(1, 0).view(c, b, g, 1, r, 1),
                                   T)
    V = T.movedim(0, 1) * w.view(b, c, g, 1, r, 1)
    # 4. Every position reads its chunk's incoming state; then the output-side decay.
    Y = torch.baddbmm(Y, C_in.reshape(b * c * g, Q, n), V.reshape(b * c * g, n, r * p))
    y = Y.view(b, c, g, Q, r, p).transpose(2, 3) * out_scale.view(b, c, Q, g, r, 1)
    return y.reshape(b, c * Q, h, p), T_last


def factored_block_(x, x_scale, out_scale, w, carry, scores, B_end, C_in, D, gate, work, slots, out):
    """One block of ssd_factored without autograd: factored_block's ops into `work` buffers, updated in place.
    slots (b, c + 1, g, n, r * p) holds the incoming T in slot 0, and in slot c afterwards the T carried out of the
    block's last chunk; y, epilogue (D, then the gate silu(z)) included, is written into `out`."""
    b, _, h, p = x.shape
    _, c, g, Q, n = B_end.shape
    r = h // g
    f = x_scale.dtype
    Y = scratch(work, "Y", (b * c * g, Q, r * p), x_scale)
    x = pad_to(x, c * Q).view(b, c, Q, g, r, p).transpose(2, 3)  # (b, c, g, Q, r, p)
    if x.dtype != f:  # one vectorized cast (mixed-dtype elementwise ops are about 2x slower), into Y, where D x
        x = Y.view(b, c, g, Q, r, p).copy_(x)  # then replaces it in place
    X = torch.mul(x, x_scale.view(b, c, Q, g, r, 1).transpose(2, 3), out=scratch(work, "X", x.shape, x_scale))
    X = X.view(b * c * g, Q, r * p)
    # 1. Within each chunk.
    scores = scores.reshape(b * c * g, Q, Q)
    if D is None:
        torch.bmm(scores, X, out=Y)
    else:
        skip_start(x, out_scale, D, out=Y.view(b, c, g, Q, r, p)).view_as(Y).baddbmm_(scores, X)
    # 2. Per batch row, the chunk contributions go to slots 1..c.
    for i in range(b):
        torch.matmul(B_end[i].mT, X.view(b, c, g, Q, r * p)[i], out=slots[i, 1:])
    # 3. Carry T: slot k becomes T_k, then chunk k reads w_k T_k.
    pass_states_(slots.view(b, c + 1, g, n, r, p).movedim(1, 0), carry.movedim(1, 0).view(c, b, g, 1, r, 1))
    slots[:, :c].view(b, c, g, n, r, p).mul_(w.view(b, c, g, 1, r, 1))
    # 4. Every position reads its chunk's incoming state; then the output-side decay and the gate.
    Y = Y.view(b, c * g, Q, r * p)
    for i in range(b):
        Y[i].baddbmm_(C_in[i].reshape(c * g, Q, n), slots[i, :c].view(c * g, n, r * p))
    Y = Y.view(b, c, g, Q, r, p).transpose(2, 3)  # (b, c, Q, g, r, p), y's layout
    if out.dtype == f and out.shape[1] == c * Q and gate is None:
        torch.mul(Y, out_scale.view(b, c, Q, g, r, 1), out=out.view(b, c, Q, g, r, p))
        return
    # In place in Y while it is in cache, then one cast into y
    y = Y.mul_(out_scale.view(b, c, Q, g, r, 1)).reshape(b, c * Q, h, p)[:, :out.shape[1]]
    out.copy_(y if gate is None else y.mul_(gate))


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
