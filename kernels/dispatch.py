"""The public kernel API, with mamba-ssm / causal-conv1d signatures, and the backend dispatcher.

Backends, in the order `auto` tries them for each call:
  mamba_ssm  the CUDA packages mamba-ssm and causal-conv1d, when importable and the inputs are on CUDA;
  triton     our Triton kernels (chunked scan and decode step) on CUDA; other ops use the torch path;
  torch      our PyTorch implementations (chunked scans), on any device;
  naive      the sequential reference loops (slow; for debugging and tests).
`DISTILL_KERNELS=auto|mamba_ssm|triton|torch|naive` or `set_backend(...)` forces one.
"""

import logging
import math
import os

from .conv1d import causal_conv1d_naive, causal_conv1d_torch
from .conv1d import causal_conv1d_update as causal_conv1d_update_torch
from .rmsnorm import rmsnorm_torch
from .selective_scan import selective_scan_torch
from .selective_scan_naive import selective_scan_naive
from .ssd_chunked import DEFAULT_CHUNK_SIZE, ssd_chunked
from .ssd_naive import ssd_naive
from .state_update import selective_state_update_torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "mamba_ssm", "triton", "torch", "naive")
_forced = None
_logged = set()


def set_backend(name):
    """Force a backend for this process (None restores DISTILL_KERNELS / auto)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _forced = name


def get_backend():
    """The requested backend: set_backend's, else $DISTILL_KERNELS, else 'auto'."""
    name = _forced if _forced is not None else os.environ.get("DISTILL_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"DISTILL_KERNELS={name!r} is not a kernel backend; set it to one of {', '.join(BACKENDS)}")
    return name


def _mamba_ssm_available():
    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(tensor):
    """The backend that runs an op on `tensor` (errors name the missing piece and the fix)."""
    name = get_backend()
    if name == "auto":
        if tensor.is_cuda and _mamba_ssm_available():
            name = "mamba_ssm"
        elif tensor.is_cuda and _triton_available():
            name = "triton"
        else:
            name = "torch"
    elif name == "mamba_ssm" and not (tensor.is_cuda and _mamba_ssm_available()):
        raise ValueError("kernel backend 'mamba_ssm' needs CUDA tensors and the mamba-ssm and causal-conv1d packages; "
                         "install them or set DISTILL_KERNELS=auto")
    elif name == "triton" and not (_triton_available() and (tensor.is_cuda or _triton_interpreted())):
        raise ValueError("kernel backend 'triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         "set DISTILL_KERNELS=auto to use the torch path")
    if name not in _logged:
        _logged.add(name)
        logger.info("distill.kernels: using the %s backend for the scan kernels", name)
    return name


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=DEFAULT_CHUNK_SIZE, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                              return_final_states=False):
    """Mamba-2 scan. x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D (h,) or (h, p), z like x,
    initial_states (b, h, p, n), seq_idx (b, l) int32. Returns y (like x) [and the final states].

    The chunk size changes the cost, not the result. The GPU backends (mamba_ssm, triton) take the caller's; the
    torch path always runs at its own fastest, DEFAULT_CHUNK_SIZE (at Mamba2Config's default of 256 it would be
    about 3x slower forward+backward on CPU)."""
    backend = resolve_backend(x)
    if backend == "mamba_ssm":
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as scan
    elif backend == "triton":
        from .ssd_triton import ssd_triton as scan
    elif backend == "naive":
        scan = ssd_naive
    else:
        scan, chunk_size = ssd_chunked, DEFAULT_CHUNK_SIZE
    return scan(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Mamba-1 scan. u/delta/z (b, d, l), A (d, n), B/C (b, n, l) or (b, g, n, l), D/delta_bias (d,)."""
    backend = resolve_backend(u)
    if backend == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as scan
    else:
        scan = selective_scan_naive if backend == "naive" else selective_scan_torch
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step, Mamba-2 (state (b, h, p, n)) or Mamba-1 (state (b, d, n)) shapes; updates state in place."""
    backend = resolve_backend(x)
    if backend == "mamba_ssm":
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as step

        if state.dim() == 4:  # mamba-ssm wants the per-channel layouts; ours also accepts per-head A/dt/D/dt_bias
            h, p, n = state.shape[1:]
            dt = dt[..., None].expand(-1, h, p) if dt.dim() == 2 else dt
            A = A[:, None, None].expand(h, p, n) if A.dim() == 1 else A
            D = D[:, None].expand(h, p) if D is not None and D.dim() == 1 else D
            dt_bias = dt_bias[:, None].expand(h, p) if dt_bias is not None and dt_bias.dim() == 1 else dt_bias
    elif backend == "triton":
        from .state_update_triton import selective_state_update_triton as step
    else:
        step = selective_state_update_torch
    return step(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     activation=None):
    """Depthwise causal conv. x (b, d, l), weight (d, w); activation None or 'silu'/'swish'."""
    backend = resolve_backend(x)
    if backend == "mamba_ssm":
        from causal_conv1d import causal_conv1d_fn as conv
    else:
        conv = causal_conv1d_naive if backend == "naive" else causal_conv1d_torch
    return conv(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
                return_final_states=return_final_states, activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """Decode step(s) of the causal conv: x (b, d) or (b, d, l); conv_state (b, d, >= w - 1) updated in place;
    with cache_seqlens (b,) int32 the state is a circular buffer written at cache_seqlens % state_len."""
    if resolve_backend(x) == "mamba_ssm":
        from causal_conv1d import causal_conv1d_update as update
    else:
        update = causal_conv1d_update_torch
    # only passed when given, so causal-conv1d releases without the argument still work without it
    extra = {} if cache_seqlens is None else {"cache_seqlens": cache_seqlens}
    return update(x, conv_state, weight, bias, activation, **extra)


def rmsnorm_fn(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=False):
    """Gated RMSNorm per group: norm_before_gate=False gives rmsnorm(x * silu(z)) * weight (Mamba-2)."""
    if resolve_backend(x) == "mamba_ssm":
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as norm
    else:
        norm = rmsnorm_torch
    return norm(x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
