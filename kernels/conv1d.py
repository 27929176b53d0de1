"""Depthwise causal conv1d with causal-conv1d's signatures: a per-position loop (the definition) and the fast path:
PyTorch's depthwise conv1d (oneDNN on CPU, 2-3x faster than a loop over taps, forward and backward), and with
`seq_idx` one shifted multiply-add per tap that masks inputs of other documents (the kernel is only `width` taps
wide, so the loop is cheap).

x is (batch, dim, seqlen), weight (dim, width), bias (dim,), initial_states and final states (batch, dim,
width - 1). With `seq_idx` (batch, seqlen) a position only sees inputs of its own document; the initial
states belong to the document at position 0.
"""

import torch
import torch.nn.functional as F

from .common import compute_dtype


def _check(x, weight, bias, seq_idx, initial_states, activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"x must be (batch, dim, seqlen) and weight (dim, width), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias must be (dim,) = ({x.shape[1]},), got {tuple(bias.shape)}")
    if seq_idx is not None and seq_idx.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"seq_idx must be (batch, seqlen) = {(x.shape[0], x.shape[2])}, got {tuple(seq_idx.shape)}")
    expected = (x.shape[0], x.shape[1], weight.shape[1] - 1)
    if initial_states is not None and initial_states.shape != expected:
        raise ValueError(f"initial_states must be (batch, dim, width - 1) = {expected}, got {tuple(initial_states.shape)}")


def _padded(x, width, initial_states, f):
    """x with its width - 1 predecessors in front (the initial states, or zeros)."""
    if initial_states is None:
        return F.pad(x.to(f), (width - 1, 0))
    return torch.cat([initial_states.to(f), x.to(f)], dim=-1)


def _padded_doc(seq_idx, width):
    """seq_idx with the predecessors labelled as the first position's document."""
    return torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=1)


def _finish(out, xpad, width, x, activation, return_final_states):
    if activation is not None:
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    return out, xpad[..., xpad.shape[-1] - (width - 1):].to(x.dtype)


def causal_conv1d_naive(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                        activation=None):
    """out[:, :, t] = bias + sum_k weight[:, k] * x[:, :, t - (width - 1) + k] over inputs of t's document."""
    _check(x, weight, bias, seq_idx, initial_states, activation)
    f = compute_dtype(x.dtype)
    width = weight.shape[1]
    xpad = _padded(x, width, initial_states, f)
    doc = _padded_doc(seq_idx, width) if seq_idx is not None else None
    columns = []
    for t in range(x.shape[-1]):
        acc = x.new_zeros(x.shape[:2], dtype=f) if bias is None else bias.to(f).expand(x.shape[:2])
        for k in range(width):
            term = weight[:, k].to(f) * xpad[:, :, t + k]
            if doc is not None:
                term = term * (doc[:, t + k] == doc[:, t + width - 1]).to(f)[:, None]
            acc = acc + term
        columns.append(acc)
    out = torch.stack(columns, dim=-1) if columns else xpad[..., :0]  # an empty sequence: empty out
    return _finish(out, xpad, width, x, activation, return_final_states)


def causal_conv1d_torch(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                        activation=None):
    """The same sum: a depthwise F.conv1d over the padded input, or with seq_idx one shifted multiply-add per tap."""
    _check(x, weight, bias, seq_idx, initial_states, activation)
    f = compute_dtype(x.dtype)
    width, l = weight.shape[1], x.shape[-1]
    xpad = _padded(x, width, initial_states, f)
    if seq_idx is None and l:  # (conv1d refuses an empty sequence)
        out = F.conv1d(xpad, weight.to(f)[:, None], None if bias is None else bias.to(f), groups=x.shape[1])
        return _finish(out, xpad, width, x, activation, return_final_states)
    doc = _padded_doc(seq_idx, width) if seq_idx is not None else None
    w = weight.to(f)[:, :, None]
    out = torch.zeros_like(xpad[..., width - 1:]) if bias is None else bias.to(f)[:, None].expand(x.shape[1:]).clone()
    for k in range(width):
        term = w[:, k] * xpad[..., k:k + l]
        if doc is not None and k < width - 1:
            term = term * (doc[:, k:k + l] == seq_idx)[:, None]
        out = out + term
    return _finish(out, xpad, width, x, activation, return_final_states)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """Decode step(s): x (batch, dim) or (batch, dim, seqlen); conv_state (batch, dim, state_len >= width - 1)
    holds the latest inputs and is updated in place.

    Without cache_seqlens the state is a shift register, oldest input first. With cache_seqlens (batch,) int32
    it is a circular buffer per row: the conv's history is the width - 1 entries just before position
    cache_seqlens % state_len (wrapping around), and the new inputs are written from that position on; the
    caller advances cache_seqlens. A chunk longer than state_len leaves its last state_len inputs.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    width, state_len = weight.shape[1], conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"conv_state holds {state_len} inputs but a width-{width} conv needs at least {width - 1}")
    single = x.dim() == 2
    xs = x[..., None] if single else x
    f = compute_dtype(x.dtype)
    if cache_seqlens is None:
        window = torch.cat([conv_state.to(f), xs.to(f)], dim=-1)
        conv_state.copy_(window[..., -state_len:])
        history = window[..., state_len - (width - 1):state_len]
    else:
        if cache_seqlens.shape != (x.shape[0],):
            raise ValueError(f"cache_seqlens must be (batch,) = ({x.shape[0]},), got {tuple(cache_seqlens.shape)}")
        seqlen, dim = xs.shape[-1], xs.shape[1]
        position = cache_seqlens.to(device=x.device, dtype=torch.long)[:, None]  # (batch, 1)

        def slots(start, stop):  # buffer indices (batch, dim, stop - start) of position + start ... stop - 1
            index = (position + torch.arange(start, stop, device=x.device)) % state_len
            return index[:, None].expand(-1, dim, -1)

        history = conv_state.gather(2, slots(-(width - 1), 0)).to(f)  # read before writing
        kept = min(seqlen, state_len)
        conv_state.scatter_(2, slots(seqlen - kept, seqlen), xs[..., seqlen - kept:].to(conv_state.dtype))
    out = causal_conv1d_torch(xs, weight, bias, initial_states=history, activation=activation)
    return out[..., 0] if single else out
