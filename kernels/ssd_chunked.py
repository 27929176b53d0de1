"""Mamba-2 (SSD) scan in chunks with PyTorch ops: the fast path on CPU and any device without Triton.

The sequence is cut into chunks of Q positions (the algorithm of Mamba-2's `ssd_minimal`):

1. inside a chunk the scan is a masked, decayed attention: y_i = sum_j (C_i . B_j) exp(cs_i - cs_j) dt_j x_j;
2. each chunk's contribution to the state at its end is a (p, n) matrix;
3. a short loop over chunks carries the state from chunk to chunk;
4. every position reads its chunk's incoming state: y_i += exp(cs_i) C_i . state.

All of it runs in fp32 (float64 for float64 inputs) and uses O(L * Q) memory. Documents packed into a row
(`seq_idx`) become a document counter; every decay between two different documents is masked to zero, which
is exactly the reset of the sequential definition in `ssd_naive`.
"""

import math

import torch
import torch.nn.functional as F

from .ssd_naive import check_ssd_shapes, compute_dtype, process_dt, skip_and_gate

# Tuned on a 2-core x86 CPU with scripts/bench_kernels.py --tune (fwd+bwd, fp32, h=16, p=64, n=64).
DEFAULT_CHUNK_SIZE = 64
BLOCK_CHUNKS = 8


def document_index(seq_idx):
    """(b, l) counter that increases by one at every change of seq_idx, so equal values mean one document."""
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return F.pad(changes.cumsum(1, dtype=torch.int32), (1, 0))


def decay_exp(log_decay, mask=None):
    """exp of log-decays, zero where masked out or below log(tiny) + 20.

    The flush keeps subnormal floats (~100x slower on x86, and what GPUs flush anyway) out of the matmuls;
    a decay under e^-67 in fp32 (e^-688 in float64) is far below the resolution of any sum it enters.
    """
    keep = log_decay >= math.log(torch.finfo(log_decay.dtype).tiny) + 20
    if mask is not None:
        keep = keep & mask
    return torch.where(keep, log_decay, -math.inf).exp_()


class StatePassing(torch.autograd.Function):
    """state_{k+1} = decay_k * state_k + chunk_states_k over the leading chunk axis k, as one autograd node.

    chunk_states is (c, *S), chunk_decay (c, *D) with D broadcastable to S, initial_state S. Autograd through a
    Python loop would allocate a full-size gradient buffer per chunk (select backward); here forward and backward
    are each one loop of in-place updates. Returns the incoming state of every chunk (c, *S) and the final state.
    """

    @staticmethod
    def forward(ctx, chunk_states, chunk_decay, initial_state):
        incoming = torch.empty_like(chunk_states)
        state = initial_state.clone()
        for k in range(chunk_states.shape[0]):
            incoming[k] = state
            state.mul_(chunk_decay[k]).add_(chunk_states[k])
        ctx.save_for_backward(chunk_decay, incoming)
        return incoming, state

    @staticmethod
    def backward(ctx, grad_incoming, grad_final):
        chunk_decay, incoming = ctx.saved_tensors
        grad_states = torch.empty_like(incoming)
        grad_decay = torch.empty_like(chunk_decay)
        grad = grad_final.clone()  # gradient w.r.t. the state after chunk k, walking backwards
        for k in reversed(range(incoming.shape[0])):
            grad_states[k] = grad
            grad_decay[k] = (grad * incoming[k]).sum_to_size(chunk_decay.shape[1:])
            grad.mul_(chunk_decay[k]).add_(grad_incoming[k])
        return grad_states, grad_decay, grad


def ssd_chunked(x, dt, A, B, C, chunk_size=DEFAULT_CHUNK_SIZE, D=None, z=None, dt_bias=None, initial_states=None,
                seq_idx=None, dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False):
    """mamba_chunk_scan_combined's contract. The sequence is processed in blocks of BLOCK_CHUNKS chunks, the
    state carried between blocks, so the (b, h, positions, Q) intermediates stay cache-sized."""
    check_ssd_shapes(x, dt, A, B, C, D, z, initial_states, seq_idx)
    b, l, h, p = x.shape
    n = B.shape[3]
    f = compute_dtype(x.dtype)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, f)
    xdt = x.to(f) * dt[..., None]
    A, B, C = A.to(f), B.to(f), C.to(f)
    doc = document_index(seq_idx) if seq_idx is not None else None
    state = x.new_zeros(b, h, p, n, dtype=f) if initial_states is None else initial_states.to(f)
    block = chunk_size * BLOCK_CHUNKS
    # split, not slicing: its backward concatenates the block gradients once instead of padding each to full size
    pieces = zip(*(t.split(block, dim=1) for t in (xdt, dt, B, C)))
    ys = []
    for start, (block_xdt, block_dt, block_B, block_C) in zip(range(0, l, block), pieces):
        block_doc = None
        if doc is not None:
            block_doc = doc[:, start:start + block]
            if start:  # a document that starts exactly at the block boundary does not see the carried state
                state = state * (doc[:, start] == doc[:, start - 1]).to(f)[:, None, None, None]
        y, state = ssd_block(block_xdt, block_dt, A, block_B, block_C, state, block_doc, chunk_size)
        ys.append(y)
    y = skip_and_gate(torch.cat(ys, dim=1), x.to(f), D, z).to(x.dtype)
    return (y, state.to(x.dtype)) if return_final_states else y


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
        doc = torch.cat([doc, doc[:, -1:].expand(b, pad)], dim=1).view(b, 1, c, 1, Q)
        doc_end = doc[..., -1]  # (b, 1, c, 1): the document each chunk's final state belongs to
        doc_in = torch.cat([doc[:, :, :1, :, 0], doc_end[:, :, :-1]], dim=2)  # the incoming state's document
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
