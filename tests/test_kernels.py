"""Kernels vs their float64 sequential references: property tests, gradchecks, decode steps, the dispatcher."""

import ast
import importlib.util
import logging
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tolerances import within

from distill.kernels import dispatch as kernels
from distill.kernels.common import process_dt
from distill.kernels.conv1d import causal_conv1d_naive, causal_conv1d_torch
from distill.kernels.rmsnorm import rmsnorm_torch
from distill.kernels.selective_scan import selective_scan_torch
from distill.kernels.selective_scan_naive import selective_scan_naive
from distill.kernels.ssd_chunked import DEFAULT_CHUNK_SIZE, flush_log, ssd_chunked
from distill.kernels.ssd_naive import ssd_naive
from distill.kernels.state_update import selective_state_update_torch

KERNELS_DIR = pathlib.Path(kernels.__file__).parent
# Tolerances. Fast paths are checked against float64 sequential loops with rel_err (a norm over the whole output)
# or, where the terms of a sum may cancel, err_vs_magnitude (the same error over the norm of the sum of |terms|).
# Every bound is derived from the dtype's unit roundoff u (2^-24 fp32, 2^-9 bf16, 2^-53 float64), the problem's
# size and its conditioning, by the helpers below (scan_bound, grad_bound, output_rounding):
# - a scan output: each term passes through at most l + n + 10 rounded ops (l steps of the state recurrence or
#   of the chunk cumsums, n products in state . C, ten elementwise ones: bias, softplus, exp, dt * x, D * x,
#   silu(z), ...), so its error is at most (l + n + 10) u of the summed |terms| (Higham's gamma_k, a worst
#   case); the chunked paths compute exp(cs_i - cs_j) from chunk cumsums of log-decays up to `span` in size, whose
#   difference rounds at span * u each (the conditioning of the decay), hence + 2 * span;
# - a gradient entry sums `terms` such products (A's sums over every position, head, channel and state);
#   independent roundings add in quadrature, so the scan bound times sqrt(terms), relative to the gradient itself;
# - a bf16 / fp16 output: the reference gets the same rounded inputs, so what is left is the output's rounding
#   (at most u of each value, which a one-element case reaches), three times that (the stress run's 2x margin
#   over the worst case), plus the fp32 scan bound;
# - torch.equal only within one process and thread count, where the code runs the same ops in the same order
#   (said at each use).
# Every check goes through within(), which records err / bound when DISTILL_TOLERANCE_LOG names a file, so a
# stress run (scripts/stress_tolerances.py) can report how close each test comes to its bound.
STRESS = int(os.environ.get("DISTILL_STRESS", "1"))  # multiplies every property test's example count
FAST = settings(max_examples=25 * STRESS, deadline=None)


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def scan_bound(l, n, span=0.0, dtype=torch.float32):
    """Error of a scan output over its summed |terms| (tolerance note): l steps, n states, log-decay span."""
    return unit_roundoff(dtype) * (l + n + 10 + 2 * span)


def grad_bound(l, n, span, terms, dtype=torch.float32):
    """Relative error of a gradient whose entries each sum `terms` of the scan's products (tolerance note)."""
    return scan_bound(l, n, span, dtype) * math.sqrt(max(terms, 1))


def output_rounding(dtype):
    """An output's rounding to `dtype`, three times its worst case (tolerance note)."""
    return 3 * unit_roundoff(dtype)


def log_decay_span(dt, A, chunk, dt_bias=None, dt_softplus=False):
    """The largest |cumsum of dt * A| inside a chunk of `chunk` positions: the conditioning of the chunked paths'
    decays exp(cs_i - cs_j) (tolerance note). dt (b, l, h) before its bias and softplus, A (h,)."""
    dt = process_dt(dt.double(), None if dt_bias is None else dt_bias.double(), dt_softplus, dtype=torch.float64)
    log_decay = dt * A.double()
    pad = (-log_decay.shape[1]) % chunk
    log_decay = F.pad(log_decay, (0, 0, 0, pad)).unflatten(1, (-1, chunk))
    return log_decay.cumsum(2).abs().max().item() if log_decay.numel() else 0.0


def rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def err_vs_magnitude(actual, expected, magnitude):
    """||actual - expected|| / ||magnitude||: rel_err for sums whose terms may cancel (see the tolerance note)."""
    return ((actual.double() - expected.double()).norm() / magnitude.norm().clamp_min(1e-30)).item()


def cast(values, dtype):
    """A dict of arguments with its floating tensors in `dtype` (ints, bools and None untouched)."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in values.items()}


def random_seq_idx(generator, b, l, docs):
    """(b, l) int32 document ids with `docs` - 1 random boundaries per row."""
    rows = []
    for _ in range(b):
        cuts = torch.randperm(max(l - 1, 1), generator=generator)[: docs - 1] + 1
        row = torch.zeros(l, dtype=torch.int32)
        for cut in cuts.tolist():
            row[cut:] += 1
        rows.append(row)
    return torch.stack(rows)


def ssd_inputs(seed, b, l, g, r, p, n, D_shape, z, init, docs, bias, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    h = g * r

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    inputs = {
        "x": randn(b, l, h, p),
        "dt": randn(b, l, h),
        "A": -torch.rand(h, generator=gen, dtype=torch.float64).mul(4).add(0.1).to(dtype),
        "B": randn(b, l, g, n),
        "C": randn(b, l, g, n),
    }
    options = {"dt_softplus": True}
    if D_shape == "h":
        options["D"] = randn(h)
    elif D_shape == "hp":
        options["D"] = randn(h, p)
    if z:
        options["z"] = randn(b, l, h, p)
    if init:
        options["initial_states"] = randn(b, h, p, n)
    if docs > 1:
        options["seq_idx"] = random_seq_idx(gen, b, l, docs)
    if bias:
        options["dt_bias"] = randn(h)
    return inputs, options


def ssd_magnitude(inputs, options):
    """ssd_naive (float64) over the absolute value of every term: |x|, |B|, |C|, |D|, |initial state|, then |silu(z)|
    (dt and the decays are positive already). Rounding errors scale with it, not with the result."""
    magnitude = {k: v.abs() if k in ("x", "B", "C", "D", "initial_states") else v
                 for k, v in {**inputs, **options}.items() if k != "z"}
    y, s = ssd_naive(**cast(magnitude, torch.float64), return_final_states=True)
    z = options.get("z")
    return (y if z is None else y * F.silu(z.double()).abs()), s


def ssd_span(inputs, options, chunk):
    """log_decay_span of an ssd_inputs case at `chunk`."""
    return log_decay_span(inputs["dt"], inputs["A"], chunk, options.get("dt_bias"), options.get("dt_softplus"))


def ssd_grad_bounds(leaves, x, n, chunk, span, dtype=torch.float32):
    """grad_bound for each leaf of an SSD call at `chunk`: an entry of a leaf's gradient sums x.numel() * n / its
    numel products (A's: every position, channel and state of its head); the log-decay's parameters (A, dt,
    dt_bias) also sum over the pairs (i, j) of a chunk whose decay exp(cs_i - cs_j) they enter, `chunk` times
    more terms."""
    l = x.shape[1]
    return {k: grad_bound(l, n, span, x.numel() * n // v.numel() * (chunk if k in ("A", "dt", "dt_bias") else 1),
                          dtype) for k, v in leaves.items()}


ssd_cases = {
    "seed": st.integers(0, 2**16),
    "b": st.integers(1, 2),
    "l": st.integers(1, 41),
    "g": st.sampled_from([1, 2]),
    "r": st.sampled_from([1, 3]),
    "p": st.integers(1, 5),
    "n": st.integers(1, 6),
    "D_shape": st.sampled_from([None, "h", "hp"]),
    "z": st.booleans(),
    "init": st.booleans(),
    "docs": st.sampled_from([1, 2, 4]),
    "bias": st.booleans(),
    "chunk": st.sampled_from([4, 8, 16]),
}


@FAST
@given(**ssd_cases)
def test_ssd_chunked_matches_naive(seed, b, l, g, r, p, n, D_shape, z, init, docs, bias, chunk):
    inputs, options = ssd_inputs(seed, b, l, g, r, p, n, D_shape, z, init, docs, bias)
    y_ref, s_ref = ssd_naive(**inputs, **options, return_final_states=True)
    f32 = cast({**inputs, **options}, torch.float32)
    y, s = ssd_chunked(**f32, chunk_size=chunk, return_final_states=True)
    assert y.dtype == torch.float32 and s.shape == s_ref.shape
    y_abs, s_abs = ssd_magnitude(inputs, options)  # tiny random cases (n = 1, l = 1) can cancel
    bound = scan_bound(l, n, ssd_span(inputs, options, chunk))  # fp32 (tolerance note)
    within(err_vs_magnitude(y, y_ref, y_abs), bound, "y")
    within(err_vs_magnitude(s, s_ref, s_abs), bound, "state")
    # Through the public API with a forced backend too: it runs ssd_chunked at DEFAULT_CHUNK_SIZE whatever chunk
    # it is given, so the same ops on the same inputs in this process and thread: the same bits.
    kernels.set_backend("torch")
    try:
        expected = ssd_chunked(**f32, chunk_size=DEFAULT_CHUNK_SIZE)
        assert torch.equal(kernels.mamba_chunk_scan_combined(**f32, chunk_size=chunk), expected)
    finally:
        kernels.set_backend(None)


@settings(max_examples=10 * STRESS, deadline=None)
@given(**ssd_cases)
def test_ssd_chunked_bf16(seed, b, l, g, r, p, n, D_shape, z, init, docs, bias, chunk):
    inputs, options = ssd_inputs(seed, b, l, g, r, p, n, D_shape, z, init, docs, bias, dtype=torch.bfloat16)
    y = ssd_chunked(**inputs, **options, chunk_size=chunk)
    assert y.dtype == torch.bfloat16
    y_ref = ssd_naive(**cast({**inputs, **options}, torch.float64))
    bound = output_rounding(torch.bfloat16) + scan_bound(l, n, ssd_span(inputs, options, chunk))  # tolerance note
    within(err_vs_magnitude(y, y_ref, ssd_magnitude(inputs, options)[0]), bound)


def test_ssd_seq_idx_equals_separate_documents():
    """A packed row gives exactly what each document gives on its own (the first one continuing the initial state)."""
    inputs, options = ssd_inputs(1, 1, 30, 1, 2, 3, 4, "h", True, True, 1, False)
    seq_idx = torch.tensor([[3] * 11 + [7] * 13 + [3] * 6], dtype=torch.int32)  # ids may repeat: 3 docs
    y = ssd_chunked(**inputs, **options, seq_idx=seq_idx, chunk_size=8)
    for start, stop in [(0, 11), (11, 24), (24, 30)]:
        part = {k: v[:, start:stop] for k, v in inputs.items() if k != "A"}
        opts = {**options, "z": options["z"][:, start:stop]}
        if start:
            opts.pop("initial_states")
        alone = ssd_naive(**part, A=inputs["A"], **opts)
        # float64: the same terms summed in other chunk groupings (tolerance note)
        within(rel_err(y[:, start:stop], alone), scan_bound(30, 4, ssd_span(inputs, options, 8), torch.float64))


def test_ssd_documents_starting_at_block_boundaries():
    """chunk 4 -> blocks of 32 positions: documents that start exactly at a block or chunk edge, or inside a chunk,
    reset exactly, in the no-grad blocks and, to the bit, under autograd."""
    inputs, options = ssd_inputs(4, 2, 70, 1, 2, 3, 4, "h", True, True, 1, False)
    seq_idx = torch.zeros(2, 70, dtype=torch.int32)
    seq_idx[0, 32:], seq_idx[0, 64:] = 1, 2
    seq_idx[1, 36:], seq_idx[1, 50:] = 1, 2
    y, s = ssd_chunked(**inputs, **options, seq_idx=seq_idx, chunk_size=4, return_final_states=True)
    y_ref, s_ref = ssd_naive(**inputs, **options, seq_idx=seq_idx, return_final_states=True)
    bound = scan_bound(70, 4, ssd_span(inputs, options, 4), torch.float64)  # tolerance note
    within(rel_err(y, y_ref), bound, "y")
    within(rel_err(s, s_ref), bound, "state")
    x = inputs["x"].clone().requires_grad_(True)
    y_grad, s_grad = ssd_chunked(**{**inputs, "x": x}, **options, seq_idx=seq_idx, chunk_size=4,
                                 return_final_states=True)
    # same process and thread: both paths run the same ops in the same order (ssd_factored's docstring)
    assert torch.equal(y, y_grad.detach()) and torch.equal(s, s_grad.detach())


PATHS = {"factored": ([0.05] * 4, ["ssd_factored"]), "pairwise": ([3.0] * 4, ["ssd_pairwise"]),
         "mixed": ([0.05, 3.0, 0.05, 0.05], ["ssd_factored", "ssd_pairwise"])}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("docs", [1, 3])
def test_ssd_factored_and_pairwise_decays(path, docs, monkeypatch):
    """Heads with small in-chunk decays take the factored path, heads with a chunk that spans beyond the flush
    threshold the pairwise one (per head: "mixed"); all match the float64 loop (fp32) and its gradients (float64)."""
    import distill.kernels.ssd_chunked as module

    used = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            used.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in ("ssd_factored", "ssd_pairwise"):
        monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
    scales, expected_paths = PATHS[path]
    inputs, options = ssd_inputs(11, 2, 45, 2, 2, 3, 4, "hp", True, True, docs, False)
    inputs["A"] = -inputs["A"].abs() - 1
    # dt_softplus=False: chunk spans of ~1 or of ~100
    inputs["dt"] = inputs["dt"].abs() * torch.tensor(scales, dtype=torch.float64)
    options["dt_softplus"] = False
    y_ref, s_ref = ssd_naive(**inputs, **options, return_final_states=True)
    y, s = ssd_chunked(**cast({**inputs, **options}, torch.float32), chunk_size=16, return_final_states=True)
    span = ssd_span(inputs, options, 16)  # ~1 or ~100 (tolerance note)
    within(rel_err(y, y_ref), scan_bound(45, 4, span), "y")  # fp32
    within(rel_err(s, s_ref), scan_bound(45, 4, span), "state")
    assert used == expected_paths
    leaves = {k: v for k, v in {**inputs, **options}.items() if torch.is_tensor(v) and v.is_floating_point()}
    grads = {}
    for name, fn in [("ref", ssd_naive), ("fast", ssd_chunked)]:
        args = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
        y, s = fn(**args, seq_idx=options.get("seq_idx"), chunk_size=16, return_final_states=True)
        (y.sin().sum() + s.square().sum()).backward()
        grads[name] = {k: v.grad for k, v in args.items()}
    bounds = ssd_grad_bounds(leaves, inputs["x"], 4, 16, span, torch.float64)  # float64 (tolerance note)
    for k in leaves:
        within(rel_err(grads["fast"][k], grads["ref"][k]), bounds[k], k)


@pytest.mark.parametrize("grad", [False, True])
def test_ssd_factored_at_steep_decays(grad):
    """Chunks whose decays span up to e^-60, just inside the factored path's bound: its factors and the carried
    state T (chunk_factors) reach e^+-30 and more, and y, the final state and dx still match the float64 loop."""
    inputs, options = ssd_inputs(15, 2, 100, 2, 2, 3, 4, "h", False, True, 3, False)
    inputs["dt"] = torch.full_like(inputs["dt"], 0.25)
    inputs["A"] = -torch.tensor([15.0, 12.0, 8.0, 1.0], dtype=torch.float64)  # spans 60, 48, 32, 4 per chunk of 16
    options["dt_softplus"] = False
    assert 16 * 0.25 * 15 < -flush_log(torch.float32)  # the steepest head stays factored
    y_ref, s_ref = ssd_naive(**inputs, **options, return_final_states=True)
    f32 = cast({**inputs, **options}, torch.float32)
    x = f32["x"].clone().requires_grad_(grad)
    y, s = ssd_chunked(**{**f32, "x": x}, chunk_size=16, return_final_states=True)
    # fp32; the factors' exponents reach the chunk's span, 60 (tolerance note)
    bound = scan_bound(100, 4, ssd_span(inputs, options, 16))
    within(rel_err(y, y_ref), bound, "y")
    within(rel_err(s, s_ref), bound, "state")
    if grad:
        x_ref = inputs["x"].clone().requires_grad_(True)
        (ssd_naive(**{**inputs, "x": x_ref}, **options) * y_ref).sum().backward()
        (y * y_ref.float()).sum().backward()
        within(rel_err(x.grad, x_ref.grad), bound, "dx")  # the same factors, backwards


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(12, 2, 150, 2, 3, 4, 4, "h"), (37, 3, 150, 1, 3, 4, 2, "hp")])
def test_ssd_no_grad_in_place_equals_autograd(dtype, shape):
    """Without autograd the factored path goes in blocks with reused buffers, updated in place: the same ops in the
    same order as the autograd path, so the same bits (what a model computes in training it computes in eval).
    Both shapes have 3 blocks (chunk 8) and a gate z; in the second a position's h * p = 12 values are not a whole
    number of SIMD vectors, where silu computed block by block would differ in the last bit."""
    inputs, options = ssd_inputs(*shape, True, True, 4, True)
    args = cast({**inputs, **options}, dtype)
    with torch.no_grad():
        y0, s0 = ssd_chunked(**args, chunk_size=8, return_final_states=True)
    x = args["x"].clone().requires_grad_(True)
    y1, s1 = ssd_chunked(**{**args, "x": x}, chunk_size=8, return_final_states=True)
    assert torch.equal(y0, y1.detach()) and torch.equal(s0, s1.detach())  # same process and thread: see docstring


def test_ssd_workspace_reuse_keeps_results_apart():
    """The no-grad forward reuses a per-thread workspace between calls: an earlier result is not overwritten by a
    later call, and a float64 call after a float32 one (or a larger one after a smaller) gets its own buffers."""
    small, large = ({**inputs, **options} for inputs, options in (
        ssd_inputs(14, 1, 40, 2, 3, 4, 4, "h", True, True, 1, True),
        ssd_inputs(13, 2, 150, 2, 3, 4, 4, "h", True, True, 3, True)))
    with torch.no_grad():
        first = ssd_chunked(**small, chunk_size=8)
        kept = first.clone()
        for args, reference in ((cast(small, torch.float32), small), (large, large),
                                (cast(large, torch.float32), large), (small, small)):
            span = log_decay_span(reference["dt"], reference["A"], 8, reference["dt_bias"], True)
            bound = scan_bound(150, 4, span, args["x"].dtype)  # tolerance note
            within(rel_err(ssd_chunked(**args, chunk_size=8), ssd_naive(**reference)), bound)
    assert torch.equal(first, kept)  # a copy vs the original: any change is an overwrite


@pytest.mark.parametrize("grad", [False, True])
def test_ssd_under_bf16_autocast_computes_in_fp32(grad):
    """A bf16-autocast caller (training with precision: bf16) gets the fp32 scan, with or without autograd."""
    inputs, options = ssd_inputs(13, 2, 150, 2, 3, 4, 4, "h", True, True, 4, True)
    inputs = cast(inputs, torch.float32)
    expected = ssd_chunked(**inputs, **options, chunk_size=8)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        x = inputs["x"].clone().requires_grad_(grad)
        y = ssd_chunked(**{**inputs, "x": x}, **options, chunk_size=8)
    assert y.dtype == torch.float32
    # fp32 inside either way, the same ops (no-grad and autograd paths give the same bits) in the same process
    # and thread: only a bf16 computation would differ
    assert torch.equal(y.detach(), expected.detach())


def test_ssd_gradcheck():
    inputs, options = ssd_inputs(0, 1, 9, 2, 1, 2, 2, "hp", True, True, 3, True)
    tensors = {k: v for k, v in {**inputs, **options}.items() if torch.is_tensor(v) and v.is_floating_point()}
    names = list(tensors)
    for t in tensors.values():
        t.requires_grad_(True)

    def f(*args):
        return ssd_chunked(**dict(zip(names, args)), seq_idx=options["seq_idx"], dt_softplus=True, chunk_size=4,
                           return_final_states=True)

    assert torch.autograd.gradcheck(f, tuple(tensors.values()), fast_mode=True)  # float64, gradcheck's defaults


def test_ssd_gradients_fp32_realistic():
    """fp32 gradients of every input, initial_states included, against float64 naive autograd."""
    inputs, options = ssd_inputs(5, 2, 150, 2, 2, 16, 16, "h", True, True, 3, True)
    leaves = {k: v for k, v in {**inputs, **options}.items() if torch.is_tensor(v) and v.is_floating_point()}
    grads = {}
    for name, fn, dtype in [("ref", ssd_naive, torch.float64), ("fast", ssd_chunked, torch.float32)]:
        args = {k: v.detach().to(dtype).requires_grad_(True) for k, v in leaves.items()}
        y, s = fn(**args, seq_idx=options["seq_idx"], dt_softplus=True, chunk_size=32, return_final_states=True)
        gen = torch.Generator().manual_seed(0)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)).sum() + s.square().sum()
        loss.backward()
        grads[name] = {k: v.grad for k, v in args.items()}
    bounds = ssd_grad_bounds(leaves, inputs["x"], 16, 32, ssd_span(inputs, options, 32))  # fp32 (tolerance note)
    for name in leaves:
        within(rel_err(grads["fast"][name], grads["ref"][name]), bounds[name], name)


def ssd_grads(fn, leaves, options, chunk, dtypes=None):
    """Gradients of every floating leaf of fn's output and final state (a random output weighting plus the state's
    square), with each leaf in dtypes[k] (float64 when not named)."""
    args = {k: v.detach().to((dtypes or {}).get(k, v.dtype)).requires_grad_(True) for k, v in leaves.items()}
    y, s = fn(**args, seq_idx=options.get("seq_idx"), dt_softplus=options["dt_softplus"], chunk_size=chunk,
              return_final_states=True)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ((y.double() * weights).sum() + s.double().square().sum()).backward()
    return {k: v.grad for k, v in args.items()}


@pytest.mark.parametrize("docs", [1, 4])
def test_ssd_gradients_across_blocks(docs):
    """The factored path's hand-written backward (FactoredScan) goes back through blocks of BLOCK_CHUNKS chunks:
    18 chunks of 4 are three blocks, the last one partial and ending in a partial chunk; two groups of two heads,
    D per channel, a gate, an initial state and (docs=4) documents, one of them starting at a block boundary. Every
    gradient matches float64 autograd through the naive loop."""
    inputs, options = ssd_inputs(21, 2, 70, 2, 2, 3, 4, "hp", True, True, docs, True)
    if docs > 1:
        options["seq_idx"][0] = (torch.arange(70) >= 32).int() + (torch.arange(70) >= 45).int()
    inputs["dt"] = inputs["dt"] - 2  # softplus: dt ~0.1, so every head stays factored
    leaves = {k: v for k, v in {**inputs, **options}.items() if torch.is_tensor(v) and v.is_floating_point()}
    ref, fast = (ssd_grads(fn, leaves, options, 4) for fn in (ssd_naive, ssd_chunked))
    bounds = ssd_grad_bounds(leaves, inputs["x"], 4, 4, ssd_span(inputs, options, 4), torch.float64)  # tolerance note
    for k in leaves:
        within(rel_err(fast[k], ref[k]), bounds[k], k)


def test_ssd_gradients_bf16_inputs():
    """bf16 activations (x, dt, B, C, z) with fp32 parameters, as a bf16 model calls the scan: the gradients come
    back in each leaf's dtype and match float64 autograd on the same (rounded) values."""
    inputs, options = ssd_inputs(22, 2, 150, 1, 4, 8, 8, "h", True, True, 3, True)
    inputs["dt"] = inputs["dt"] - 2  # every head factored
    activations = ("x", "dt", "B", "C", "z")
    leaves = {k: v.to(torch.bfloat16).double() if k in activations else v
              for k, v in {**inputs, **options}.items() if torch.is_tensor(v) and v.is_floating_point()}
    dtypes = {k: torch.bfloat16 if k in activations else torch.float32 for k in leaves}
    ref, fast = ssd_grads(ssd_naive, leaves, options, 8), ssd_grads(ssd_chunked, leaves, options, 8, dtypes)
    bounds = ssd_grad_bounds(leaves, inputs["x"], 8, 8, ssd_span(inputs, options, 8))  # fp32 inside
    for k in leaves:
        assert fast[k].dtype == dtypes[k]
        # plus the rounding of the bf16 final state (whose square the loss takes) and of bf16 gradients: 2 u of bf16,
        # within output_rounding's 3 u (tolerance note)
        within(rel_err(fast[k], ref[k]), bounds[k] + output_rounding(torch.bfloat16), k)


def test_ssd_mixed_precision_keeps_dtype_and_accuracy():
    inputs, options = ssd_inputs(3, 1, 64, 1, 2, 8, 8, "h", True, False, 1, False)
    half = cast({**inputs, **options}, torch.float16)
    y, s = ssd_chunked(**half, chunk_size=16, return_final_states=True)
    assert y.dtype == s.dtype == torch.float16
    bound = output_rounding(torch.float16) + scan_bound(64, 8, ssd_span(inputs, options, 16))  # tolerance note
    within(rel_err(y, ssd_naive(**cast(half, torch.float64))), bound)


def test_ssd_dt_limit_and_shape_errors():
    inputs, _ = ssd_inputs(0, 1, 9, 1, 1, 2, 2, None, False, False, 1, False)
    clamped = ssd_chunked(**inputs, chunk_size=4, dt_softplus=True, dt_limit=(0.2, 0.5))
    expected = ssd_naive(**inputs, dt_softplus=True, dt_limit=(0.2, 0.5))
    # float64; clamped dt <= 0.5 and |A| <= 4.1 keep the span of a chunk of 4 below 9 (tolerance note)
    within(rel_err(clamped, expected), scan_bound(9, 2, 9.0, torch.float64))
    assert rel_err(clamped, ssd_naive(**inputs, dt_softplus=True)) > 1e-3  # the clamp did something
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd_chunked(inputs["x"].repeat(1, 1, 3, 1), inputs["dt"].repeat(1, 1, 3), inputs["A"].repeat(3),
                    inputs["B"].repeat(1, 1, 2, 1), inputs["C"].repeat(1, 1, 2, 1), chunk_size=4)
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunked(inputs["x"], inputs["dt"][:, :-1], inputs["A"], inputs["B"], inputs["C"], chunk_size=4)


# ----------------------------------------------------------------------------- Mamba-1 selective scan


def selective_inputs(seed, b, d, n, l, groups, D, z, bias, dtype=torch.float64, a_scale=4.0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    bc_shape = (b, n, l) if groups == 0 else (b, groups, n, l)
    args = {"u": randn(b, d, l), "delta": randn(b, d, l),
                "A": -torch.rand(d, n, generator=gen, dtype=torch.float64).mul(a_scale).to(dtype),
                "B": randn(*bc_shape), "C": randn(*bc_shape), "delta_softplus": True}
    if D:
        args["D"] = randn(d)
    if z:
        args["z"] = randn(b, d, l)
    if bias:
        args["delta_bias"] = randn(d)
    return args


def selective_scan_magnitude(args):
    """The float64 scan of the absolute values of every term: the output and state that |u|, |B|, |C|, |D| and
    |silu(z)| give (decays and delta are positive already). Rounding errors scale with it, not with the result."""
    magnitude = {**args, "u": args["u"].abs(), "B": args["B"].abs(), "C": args["C"].abs(), "z": None,
                 "D": None if args.get("D") is None else args["D"].abs()}
    y, s = selective_scan_naive(**magnitude, return_last_state=True)
    return (y if args.get("z") is None else y * F.silu(args["z"]).abs()), s


@FAST
@given(seed=st.integers(0, 2**16), b=st.integers(1, 2), d=st.sampled_from([2, 4, 6]), n=st.integers(1, 5),
       l=st.integers(1, 70), groups=st.sampled_from([0, 1, 2]), D=st.booleans(), z=st.booleans(),
       bias=st.booleans(), a_scale=st.sampled_from([1.0, 30.0]))
@example(seed=64067, b=1, d=6, n=3, l=1, groups=0, D=False, z=False, bias=True, a_scale=1.0)  # B.C cancels to 2e-4
def test_selective_scan_matches_naive(seed, b, d, n, l, groups, D, z, bias, a_scale):
    args = selective_inputs(seed, b, d, n, l, groups, D, z, bias, a_scale=a_scale)
    y_ref, s_ref = selective_scan_naive(**args, return_last_state=True)
    y_abs, s_abs = selective_scan_magnitude(args)
    y, s = selective_scan_torch(**cast(args, torch.float32), return_last_state=True)
    # fp32, per-step decays (no cumsums: span 0), against the summed |terms| (tolerance note). Relative to the
    # result itself there is no bound: at seed=64067, b=1, d=6, n=3, l=1 the B.C terms cancel to 2e-4 of them.
    within(err_vs_magnitude(y, y_ref, y_abs), scan_bound(l, n), "y")
    within(err_vs_magnitude(s, s_ref, s_abs), scan_bound(l, n), "state")
    bf16 = cast(args, torch.bfloat16)
    y16 = selective_scan_torch(**bf16)
    assert y16.dtype == torch.bfloat16
    # bf16 output rounding and fp32 compute; the inputs are the same bf16 values (tolerance note)
    within(err_vs_magnitude(y16, selective_scan_naive(**cast(bf16, torch.float64)), y_abs),
           output_rounding(torch.bfloat16) + scan_bound(l, n), "bf16")


def test_selective_scan_no_grad_equals_autograd():
    """The no-grad segments run the recurrence in place with the autograd path's ops: the same bits."""
    args = cast(selective_inputs(3, 2, 6, 3, 150, 2, True, True, True, a_scale=1.0), torch.float32)  # 3 segments
    with torch.no_grad():
        y0, s0 = selective_scan_torch(**args, return_last_state=True)
    u = args["u"].clone().requires_grad_(True)
    y1, s1 = selective_scan_torch(**{**args, "u": u}, return_last_state=True)
    assert torch.equal(y0, y1.detach()) and torch.equal(s0, s1.detach())  # same process and thread, same ops


def test_selective_scan_gradcheck():
    args = selective_inputs(0, 2, 4, 3, 9, 2, True, True, True)
    names = [k for k, v in args.items() if torch.is_tensor(v)]
    tensors = tuple(args[k].requires_grad_(True) for k in names)

    def f(*ts):
        return selective_scan_torch(**dict(zip(names, ts)), delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(f, tensors, fast_mode=True)  # float64, gradcheck's defaults


def test_selective_scan_gradients_fp32_realistic():
    args = selective_inputs(8, 2, 32, 16, 200, 2, True, True, True)
    leaves = {k: v for k, v in args.items() if torch.is_tensor(v)}
    grads = {}
    for name, fn, dtype in [("ref", selective_scan_naive, torch.float64), ("fast", selective_scan_torch, torch.float32)]:
        tensors = {k: v.detach().to(dtype).requires_grad_(True) for k, v in leaves.items()}
        y, last = fn(**tensors, delta_softplus=True, return_last_state=True)
        gen = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)).sum() + last.square().sum()
        loss.backward()
        grads[name] = {k: v.grad for k, v in tensors.items()}
    for name, leaf in leaves.items():
        # fp32, per-step decays (span 0); an entry sums u.numel() * n / its numel products (tolerance note)
        bound = grad_bound(200, 16, 0.0, leaves["u"].numel() * 16 // leaf.numel())
        within(rel_err(grads["fast"][name], grads["ref"][name]), bound, name)


# ----------------------------------------------------------------------------- causal conv1d


@FAST
@given(seed=st.integers(0, 2**16), b=st.integers(1, 2), d=st.integers(1, 5), l=st.integers(1, 20),
       width=st.integers(1, 5), bias=st.booleans(), docs=st.sampled_from([1, 3]), init=st.booleans(),
       activation=st.sampled_from([None, "silu"]))
def test_causal_conv1d_matches_naive(seed, b, d, l, width, bias, docs, init, activation):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, l, generator=gen, dtype=torch.float64)
    weight = torch.randn(d, width, generator=gen, dtype=torch.float64)
    kwargs = {"bias": torch.randn(d, generator=gen, dtype=torch.float64) if bias else None,
                  "seq_idx": random_seq_idx(gen, b, l, docs) if docs > 1 else None,
                  "initial_states": torch.randn(b, d, width - 1, generator=gen, dtype=torch.float64) if init else None,
                  "activation": activation, "return_final_states": True}
    ref, ref_final = causal_conv1d_naive(x, weight, **kwargs)
    out, final = causal_conv1d_torch(x.float(), weight.float(), **cast(kwargs, torch.float32))
    absolute = {k: v.abs() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    magnitude = causal_conv1d_naive(x.abs(), weight.abs(), **{**absolute, "activation": None})[0]
    # fp32: sums of <= width products and a bias, then silu (slope <= 1.1), against the summed |terms|
    within(err_vs_magnitude(out, ref, 1.1 * magnitude), scan_bound(width, 0), "out")
    # the final state is a copy of inputs: only their fp32 rounding (tolerance note's output rounding)
    assert final.shape == (b, d, width - 1)
    if width > 1:
        within(rel_err(final, ref_final), output_rounding(torch.float32), "state")


def test_causal_conv1d_naive_is_a_convolution():
    """The naive loop agrees with torch's own grouped conv1d (an independent definition)."""
    x, weight, bias = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(3)
    expected = torch.nn.functional.conv1d(x, weight[:, None], bias.double(), padding=3, groups=3)[..., :10]
    magnitude = torch.nn.functional.conv1d(x.abs(), weight.abs()[:, None], bias.double().abs(), padding=3, groups=3)
    # float64, both 4-term sums plus the bias (tolerance note)
    within(err_vs_magnitude(causal_conv1d_naive(x, weight, bias.double()), expected, magnitude[..., :10]),
           scan_bound(4, 0, dtype=torch.float64))


def test_causal_conv1d_gradcheck():
    x = torch.randn(1, 2, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(1, 2, 2, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda *a: causal_conv1d_torch(*a[:3], seq_idx=seq_idx, initial_states=a[3], activation="silu"), (x, w, b, s0))


@pytest.mark.parametrize("state_len", [3, 5])
def test_causal_conv1d_update_steps_equal_full_conv(state_len):
    x, weight, bias = torch.randn(2, 3, 9), torch.randn(3, 4), torch.randn(3)
    full = causal_conv1d_torch(x, weight, bias, activation="silu")
    conv_state = torch.zeros(2, 3, state_len)
    first = kernels.causal_conv1d_update(x[..., :4], conv_state, weight, bias, activation="silu")  # a prefill chunk
    steps = [kernels.causal_conv1d_update(x[..., t], conv_state, weight, bias, activation="silu") for t in range(4, 9)]
    # fp32: the same 4-term sums in another order, through silu (slope <= 1.1), as in the conv tests above
    magnitude = causal_conv1d_torch(x.abs(), weight.abs(), bias.abs())
    within(err_vs_magnitude(torch.cat([first, torch.stack(steps, -1)], -1), full, 1.1 * magnitude), scan_bound(4, 0))
    torch.testing.assert_close(conv_state, x[..., -state_len:], rtol=0, atol=0)  # copies of the inputs
    with pytest.raises(ValueError, match="activation"):
        kernels.causal_conv1d_fn(x, weight, activation="relu")


def naive_circular_update(x, buffer, weight, bias, position):
    """One row's circular-buffer decode step by hand: x (dim, seqlen), buffer (dim, state_len) updated in place."""
    width, state_len = weight.shape[1], buffer.shape[-1]
    history = [buffer[:, (position - k) % state_len].clone() for k in range(width - 1, 0, -1)]
    columns = history + list(x.unbind(-1))
    out = []
    for t in range(x.shape[-1]):
        window = columns[t:t + width]
        out.append(bias + sum(weight[:, k] * window[k] for k in range(width)))
    for t in range(x.shape[-1]):
        buffer[:, (position + t) % state_len] = x[:, t]
    return F.silu(torch.stack(out, -1))


@pytest.mark.parametrize("state_len", [3, 4, 6])
def test_causal_conv1d_update_circular_buffer(state_len):
    """cache_seqlens: rows at different offsets of a circular buffer, decoded in chunks of 1-3 and one longer than
    the buffer, equal a per-row hand computation and, over the whole sequence, the full conv."""
    gen = torch.Generator().manual_seed(state_len)
    b, d, width = 3, 4, 4
    x = torch.randn(b, d, 12, generator=gen, dtype=torch.float64)
    weight = torch.randn(d, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(d, generator=gen, dtype=torch.float64)
    conv_state = torch.zeros(b, d, state_len, dtype=torch.float64)
    cache_seqlens = torch.tensor([0, 5, 2 * state_len + 1], dtype=torch.int32)  # empty history, any offset
    expected_state = conv_state.clone()
    outs = []
    for start, stop in [(0, 1), (1, 3), (3, 4), (4, 5 + state_len), (5 + state_len, 12)]:
        chunk = x[..., start:stop]
        step = chunk[..., 0] if stop - start == 1 else chunk
        out = kernels.causal_conv1d_update(step, conv_state, weight, bias, activation="silu",
                                           cache_seqlens=cache_seqlens)
        out = out[..., None] if stop - start == 1 else out
        by_hand = torch.stack([naive_circular_update(chunk[i], expected_state[i], weight, bias, int(cache_seqlens[i]))
                               for i in range(b)])
        within(rel_err(out, by_hand), scan_bound(4, 0, dtype=torch.float64))  # float64, 4-term sums
        torch.testing.assert_close(conv_state, expected_state, rtol=0, atol=0)  # copies of the inputs
        outs.append(out)
        cache_seqlens = cache_seqlens + (stop - start)
    full = causal_conv1d_naive(x, weight, bias, activation="silu")
    within(rel_err(torch.cat(outs, -1), full), scan_bound(4, 0, dtype=torch.float64))  # float64, 4-term sums
    with pytest.raises(ValueError, match="cache_seqlens"):
        kernels.causal_conv1d_update(x[..., 0], conv_state, weight, cache_seqlens=cache_seqlens[:2])


# ----------------------------------------------------------------------------- decode step


def test_state_update_mamba2_steps_equal_scan():
    inputs, options = ssd_inputs(2, 2, 7, 2, 2, 3, 4, "hp", True, True, 1, True)
    full, final = ssd_naive(**inputs, **options, return_final_states=True)
    state = options["initial_states"].float().clone()
    h, p, n = state.shape[1:]
    A_expanded = inputs["A"].float()[:, None, None].expand(h, p, n)  # the layout transformers' Mamba2 passes
    for t in range(7):
        y = kernels.selective_state_update(
            state, inputs["x"][:, t].float(), inputs["dt"][:, t].float()[..., None].expand(-1, -1, p),
            A_expanded if t % 2 else inputs["A"].float(), inputs["B"][:, t].float(), inputs["C"][:, t].float(),
            D=options["D"].float(), z=options["z"][:, t].float(), dt_bias=options["dt_bias"].float(), dt_softplus=True)
        within(rel_err(y, full[:, t]), scan_bound(t + 1, 4), "y")  # fp32, t + 1 steps (tolerance note)
    within(rel_err(state, final), scan_bound(7, 4), "state")


def test_state_update_mamba1_steps_equal_scan():
    args = selective_inputs(4, 2, 6, 3, 5, 0, True, True, True)
    full, last = selective_scan_naive(**args, return_last_state=True)
    state = torch.zeros(2, 6, 3, dtype=torch.float64)
    for t in range(5):
        y = selective_state_update_torch(state, args["u"][..., t], args["delta"][..., t], args["A"], args["B"][..., t],
                                         args["C"][..., t], args["D"], args["z"][..., t], args["delta_bias"], True)
        within(rel_err(y, full[..., t]), scan_bound(t + 1, 3, dtype=torch.float64), "y")  # float64, t + 1 steps
    within(rel_err(state, last), scan_bound(5, 3, dtype=torch.float64), "state")


def test_state_update_bf16_state_stays_bf16():
    state = torch.randn(1, 2, 3, 4).bfloat16()
    y = kernels.selective_state_update(state, torch.randn(1, 2, 3).bfloat16(), torch.rand(1, 2).bfloat16(),
                                       -torch.ones(2), torch.randn(1, 1, 4).bfloat16(), torch.randn(1, 1, 4).bfloat16())
    assert y.dtype == state.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- gated RMSNorm


def rmsnorm_reference(x, weight, z, eps, group_size, norm_before_gate):
    """Written independently of rmsnorm.py: an explicit loop over groups in float64."""
    x, z, weight = x.double(), z.double() if z is not None else None, weight.double()
    gate = z * torch.sigmoid(z) if z is not None else None
    if gate is not None and not norm_before_gate:
        x = x * gate
    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], group_size):
        part = x[..., start:start + group_size]
        out[..., start:start + group_size] = part / torch.sqrt((part**2).mean(-1, keepdim=True) + eps)
    out = out * weight
    return out * gate if gate is not None and norm_before_gate else out


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_gated(norm_before_gate, group_size, dtype):
    x, z, weight = torch.randn(3, 5, 12).to(dtype), torch.randn(3, 5, 12).to(dtype), torch.randn(12)
    out = kernels.rmsnorm_fn(x, weight, z=z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    assert out.dtype == dtype
    # a mean of 12 squares, an rsqrt and three products in fp32, then the output's rounding (tolerance note)
    tol = (output_rounding(dtype) if dtype != torch.float32 else 0) + scan_bound(12, 0)
    within(rel_err(out, rmsnorm_reference(x, weight, z, 1e-5, group_size or 12, norm_before_gate)), tol, "gated")
    within(rel_err(rmsnorm_torch(x, weight, eps=1e-5), rmsnorm_reference(x, weight, None, 1e-5, 12, False)), tol)
    with pytest.raises(ValueError, match="group_size"):
        kernels.rmsnorm_fn(x, weight, group_size=5)


# ----------------------------------------------------------------------------- dispatcher and packaging


def test_backend_selection(monkeypatch, caplog):
    x = torch.randn(1, 5, 2, 3)
    args = (x, torch.rand(1, 5, 2), -torch.ones(2), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), 4)
    monkeypatch.setenv("DISTILL_KERNELS", "naive")
    assert kernels.resolve_backend(x) == "naive"
    assert torch.equal(kernels.mamba_chunk_scan_combined(*args), ssd_naive(*args))  # the same function
    monkeypatch.setenv("DISTILL_KERNELS", "fast")
    with pytest.raises(ValueError, match="DISTILL_KERNELS='fast'.*one of auto"):
        kernels.mamba_chunk_scan_combined(*args)
    monkeypatch.setenv("DISTILL_KERNELS", "mamba_ssm")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.mamba_chunk_scan_combined(*args)
    monkeypatch.delenv("DISTILL_KERNELS")
    kernels.set_backend("naive")
    try:
        assert kernels.get_backend() == "naive"
    finally:
        kernels.set_backend(None)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.set_backend("cuda")
    monkeypatch.setattr(kernels, "_logged", set())
    with caplog.at_level(logging.INFO, logger="distill.kernels.dispatch"):
        assert kernels.resolve_backend(x) == "torch"  # auto on CPU
        kernels.resolve_backend(x)
    assert [r.getMessage() for r in caplog.records].count(
        "distill.kernels: using the torch backend for the scan kernels") == 1


def test_modules_are_flat_and_torch_only():
    """Every module imports siblings relatively and optional packages only inside functions or try blocks."""
    allowed = {"math", "os", "logging", "threading", "torch"}
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= allowed, path.name
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 or node.module.split(".")[0] in allowed, path.name


@pytest.mark.slow  # starts a fresh Python
def test_kernels_run_when_copied_next_to_a_checkpoint(tmp_path):
    package = tmp_path / "remote_checkpoint"
    package.mkdir()
    for path in KERNELS_DIR.glob("*.py"):
        (package / path.name).write_text(path.read_text())
    code = ("import torch, sys; from remote_checkpoint.dispatch import mamba_chunk_scan_combined as f; "
            "assert 'distill' not in sys.modules; "
            "y = f(torch.randn(1, 6, 2, 3), torch.rand(1, 6, 2), -torch.ones(2), torch.randn(1, 6, 1, 4), "
            "torch.randn(1, 6, 1, 4), 4); print(tuple(y.shape))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 6, 2, 3)"


@pytest.mark.parametrize("chunk", [16, 64, 128, 256])
@pytest.mark.parametrize("grad", [False, True])
def test_public_scan_at_any_chunk_size_matches_naive(chunk, grad):
    """The caller's chunk size (16 .. 256, Mamba2Config's default) only changes the cost: the public scan on CPU runs
    at its own block size, and matches the float64 loop forward, final state and dx at every one."""
    inputs, options = ssd_inputs(21, 2, 300, 2, 2, 8, 8, "h", True, True, 3, True)
    y_ref, s_ref = ssd_naive(**inputs, **options, return_final_states=True)
    f32 = cast({**inputs, **options}, torch.float32)
    x = f32["x"].clone().requires_grad_(grad)
    y, s = kernels.mamba_chunk_scan_combined(**{**f32, "x": x}, chunk_size=chunk, return_final_states=True)
    # fp32 at the dispatcher's block size; 300 steps of random signs, no cancellation to below ~1e-2 of the
    # magnitudes, so rel_err (tolerance note)
    span = ssd_span(inputs, options, DEFAULT_CHUNK_SIZE)
    bound = scan_bound(300, 8, span)
    within(rel_err(y, y_ref), bound, "y")
    within(rel_err(s, s_ref), bound, "state")
    if grad:
        x_ref = inputs["x"].clone().requires_grad_(True)
        (ssd_naive(**{**inputs, "x": x_ref}, **options) * y_ref).sum().backward()
        (y * y_ref.float()).sum().backward()
        within(rel_err(x.grad, x_ref.grad), grad_bound(300, 8, span, 8), "dx")  # the same sums, backwards


def test_empty_sequence_gives_empty_results():
    """L = 0: every kernel returns an empty output; the scans' final state is the initial one (zeros without)."""
    b, h, p, g, n, d, width = 2, 4, 3, 2, 5, 6, 4
    x, z = torch.randn(b, 0, h, p), torch.randn(b, 0, h, p)
    dt, A, B, C = torch.rand(b, 0, h), -torch.ones(h), torch.randn(b, 0, g, n), torch.randn(b, 0, g, n)
    initial = torch.randn(b, h, p, n)
    scans = [ssd_naive, ssd_chunked, kernels.mamba_chunk_scan_combined]
    if importlib.util.find_spec("triton"):
        from distill.kernels.ssd_triton import ssd_triton
        scans.append(ssd_triton)
    for scan in scans:
        for grad in (False, True):
            xg = x.clone().requires_grad_(grad)
            y, s = scan(xg, dt, A, B, C, 8, D=torch.ones(h), z=z, initial_states=initial, return_final_states=True,
                        seq_idx=torch.zeros(b, 0, dtype=torch.int32))
            assert y.shape == x.shape and torch.equal(s, initial), scan  # nothing is computed: exact
            _, s0 = scan(xg, dt, A, B, C, 8, return_final_states=True)
            assert torch.equal(s0, torch.zeros(b, h, p, n)), scan
    u, delta, A1, B1 = torch.randn(b, d, 0), torch.rand(b, d, 0), -torch.rand(d, n), torch.randn(b, n, 0)
    for scan in (selective_scan_naive, selective_scan_torch, kernels.selective_scan_fn):
        y, s = scan(u, delta, A1, B1, B1, torch.ones(d), torch.randn(b, d, 0), None, True, True)
        assert y.shape == (b, d, 0) and torch.equal(s, torch.zeros(b, d, n)), scan
    weight, conv_state = torch.randn(d, width), torch.randn(b, d, width - 1)
    for conv in (causal_conv1d_naive, causal_conv1d_torch, kernels.causal_conv1d_fn):
        y, s = conv(u, weight, initial_states=conv_state, return_final_states=True, activation="silu")
        assert y.shape == (b, d, 0) and torch.equal(s, conv_state), conv
    kept = conv_state.clone()
    assert kernels.causal_conv1d_update(u, conv_state, weight).shape == (b, d, 0)
    assert torch.equal(conv_state, kept)  # no new inputs: the state is unchanged
    assert kernels.rmsnorm_fn(torch.randn(b, 0, 8), torch.ones(8), z=torch.randn(b, 0, 8)).shape == (b, 0, 8)


def test_chunk_size_does_not_change_the_result():
    inputs, options = ssd_inputs(9, 1, 50, 1, 2, 4, 4, "h", True, True, 3, False)
    ys = [ssd_chunked(**inputs, **options, chunk_size=q) for q in (8, 16, 64)]
    bound = scan_bound(50, 4, ssd_span(inputs, options, 64), torch.float64)  # tolerance note
    within(max(rel_err(y, ys[0]) for y in ys), bound)
    assert math.isfinite(ys[0].sum().item())
