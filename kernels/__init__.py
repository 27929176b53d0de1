"""Scan kernels: a readable reference beside each fast path, and a dispatcher (see dispatch.py).

These files import each other only relatively and need nothing beyond torch, so they can be copied flat next
to an exported checkpoint and run under `trust_remote_code=True`.
"""

from .dispatch import (
    BACKENDS,
    causal_conv1d_fn,
    causal_conv1d_update,
    get_backend,
    mamba_chunk_scan_combined,
    resolve_backend,
    rmsnorm_fn,
    selective_scan_fn,
    selective_state_update,
    set_backend,
)

__all__ = [
    "BACKENDS",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "get_backend",
    "mamba_chunk_scan_combined",
    "resolve_backend",
    "rmsnorm_fn",
    "selective_scan_fn",
    "selective_state_update",
    "set_backend",
]
