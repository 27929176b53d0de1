"""Gated RMSNorm of Mamba-2 (mamba-ssm's `rmsnorm_fn`), normalised per group of `group_size` channels.

norm_before_gate=False (Mamba-2):  y = rmsnorm_groups(x * silu(z)) * weight (+ bias)
norm_before_gate=True:             y = rmsnorm_groups(x) * weight (+ bias), then * silu(z)
The statistics are fp32; the output has x's dtype.
"""

import torch.nn.functional as F

from .common import compute_dtype


def rmsnorm_torch(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=False):
    hidden = x.shape[-1]
    group_size = hidden if group_size is None else group_size
    if hidden % group_size:
        raise ValueError(f"rmsnorm: hidden size {hidden} is not a multiple of group_size {group_size}")
    if weight.shape != (hidden,):
        raise ValueError(f"rmsnorm: weight must be ({hidden},), got {tuple(weight.shape)}")
    f = compute_dtype(x.dtype)
    out = x.to(f)
    if z is not None and not norm_before_gate:
        out = out * F.silu(z.to(f))
    groups = out.unflatten(-1, (hidden // group_size, group_size))
    out = (groups * (groups.square().mean(-1, keepdim=True) + eps).rsqrt()).flatten(-2) * weight.to(f)
    if bias is not None:
        out = out + bias.to(f)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(f))
    return out.to(x.dtype)
