"""Our Triton kernels under the Triton interpreter (TRITON_INTERPRET=1), on CPU, against float64 references.

Only verified under the interpreter here: there is no GPU in CI. Shapes are tiny because the interpreter runs
every program in numpy.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it before triton's first import

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.kernels import dispatch as kernels
from distill.kernels.selective_scan_naive import selective_scan_naive
from distill.kernels.ssd_naive import ssd_naive
from distill.kernels.state_update import selective_state_update_torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from test_kernels import (
    STRESS,
    cast,
    err_vs_magnitude,
    output_rounding,
    rel_err,
    scan_bound,
    selective_inputs,
    ssd_grad_bounds,
    ssd_inputs,
    ssd_magnitude,
    ssd_span,
)
from tolerances import within

# Tolerances: derived as in test_kernels.py (its tolerance note), from the dtype, the size and the decays' span.


@pytest.fixture(scope="module")
def triton_kernels():
    from distill.kernels import ssd_triton, state_update_triton

    jitted = ssd_triton._ssd_fwd_kernel
    if type(jitted).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (set it, or run on a CUDA machine)")
    return ssd_triton, state_update_triton


@settings(max_examples=15 * STRESS, deadline=None)
@given(seed=st.integers(0, 2**16), l=st.integers(1, 40), g=st.sampled_from([1, 2]), r=st.sampled_from([1, 2]),
       p=st.integers(1, 5), n=st.integers(1, 6), D_shape=st.sampled_from([None, "h", "hp"]), z=st.booleans(),
       init=st.booleans(), docs=st.sampled_from([1, 3]), chunk=st.sampled_from([16, 32]))
def test_ssd_triton_forward_matches_naive(triton_kernels, seed, l, g, r, p, n, D_shape, z, init, docs, chunk):
    inputs, options = ssd_inputs(seed, 1, l, g, r, p, n, D_shape, z, init, docs, True)
    y_ref, s_ref = ssd_naive(**inputs, **options, return_final_states=True)
    y, s = triton_kernels[0].ssd_triton(**cast({**inputs, **options}, torch.float32), chunk_size=chunk,
                                        return_final_states=True)
    y_abs, s_abs = ssd_magnitude(inputs, options)  # tiny random cases can cancel
    bound = scan_bound(l, n, ssd_span(inputs, options, chunk))  # fp32
    within(err_vs_magnitude(y, y_ref, y_abs), bound, "y")
    within(err_vs_magnitude(s, s_ref, s_abs), bound, "state")


def test_ssd_triton_backward_matches_naive(triton_kernels):
    """Gradients of every input, initial_states included, with groups, seq_idx, D, z, dt_bias and odd L."""
    inputs, options = ssd_inputs(5, 1, 37, 2, 2, 5, 3, "h", True, True, 3, True)
    leaves = {k: v for k, v in {**inputs, **options}.items() if torch.is_tensor(v) and v.is_floating_point()}
    grads = {}
    for name, fn, dtype in [("ref", ssd_naive, torch.float64), ("triton", triton_kernels[0].ssd_triton, torch.float32)]:
        args = {k: v.detach().to(dtype).requires_grad_(True) for k, v in leaves.items()}
        y, s = fn(**args, seq_idx=options["seq_idx"], dt_softplus=True, chunk_size=16, return_final_states=True)
        gen = torch.Generator().manual_seed(0)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)).sum() + s.square().sum()
        loss.backward()
        grads[name] = {k: v.grad for k, v in args.items()}
    # fp32; A's gradient sums over every position, channel and state of its head and the pairs of its chunk
    bounds = ssd_grad_bounds(leaves, inputs["x"], 3, 16, ssd_span(inputs, options, 16))
    for name in leaves:
        within(rel_err(grads["triton"][name], grads["ref"][name]), bounds[name], name)


def test_ssd_triton_bf16_and_dispatch(triton_kernels, monkeypatch):
    inputs, options = ssd_inputs(2, 1, 21, 1, 2, 4, 4, "h", True, False, 1, False, dtype=torch.bfloat16)
    monkeypatch.setenv("DISTILL_KERNELS", "triton")
    assert kernels.resolve_backend(inputs["x"]) == "triton"
    y = kernels.mamba_chunk_scan_combined(**inputs, **options, chunk_size=16)
    assert y.dtype == torch.bfloat16
    bound = output_rounding(torch.bfloat16) + scan_bound(21, 4, ssd_span(inputs, options, 16))  # bf16 output
    within(rel_err(y, ssd_naive(**cast({**inputs, **options}, torch.float64))), bound)


@pytest.mark.parametrize("mamba1", [False, True])
def test_state_update_triton_matches_torch(triton_kernels, mamba1):
    step = triton_kernels[1].selective_state_update_triton
    if mamba1:
        args = selective_inputs(1, 2, 6, 5, 1, 0, True, True, True, dtype=torch.float32)
        state = torch.randn(2, 6, 5)
        call = (args["u"][..., 0], args["delta"][..., 0], args["A"], args["B"][..., 0], args["C"][..., 0])
        kw = {"D": args["D"], "z": args["z"][..., 0], "dt_bias": args["delta_bias"], "dt_softplus": True}
    else:
        inputs, options = ssd_inputs(3, 2, 1, 2, 2, 3, 4, "hp", True, True, 1, True, dtype=torch.float32)
        state = options["initial_states"].clone()
        call = (inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"], inputs["B"][:, 0], inputs["C"][:, 0])
        kw = {"D": options["D"], "z": options["z"][:, 0], "dt_bias": options["dt_bias"], "dt_softplus": True}
    expected_state = state.double().clone()
    expected = selective_state_update_torch(expected_state, *cast(dict(enumerate(call)), torch.float64).values(),
                                            **cast(kw, torch.float64))
    y = step(state, *call, **kw)
    bound = scan_bound(1, state.shape[-1])  # fp32, one step
    within(rel_err(y, expected), bound, "y")
    within(rel_err(state, expected_state), bound, "state")


def test_state_update_triton_bf16_state_in_place(triton_kernels):
    state = torch.randn(1, 2, 3, 4).bfloat16()
    before = state.clone()
    y = triton_kernels[1].selective_state_update_triton(
        state, torch.randn(1, 2, 3).bfloat16(), torch.rand(1, 2).bfloat16(), -torch.ones(2),
        torch.randn(1, 1, 4).bfloat16(), torch.randn(1, 1, 4).bfloat16())
    assert y.dtype == state.dtype == torch.bfloat16 and not torch.equal(state, before)


def test_selective_scan_reference_is_the_mamba1_decode(triton_kernels):
    """The Mamba-1 decode step of the Triton kernel continues a full scan exactly."""
    args = selective_inputs(6, 1, 4, 3, 6, 0, False, False, False, dtype=torch.float32)
    _, last = selective_scan_naive(**{k: v for k, v in args.items()}, return_last_state=True)
    state = last.clone()
    u, delta, B, C = (torch.randn(1, 4), torch.randn(1, 4), torch.randn(1, 3), torch.randn(1, 3))
    y = triton_kernels[1].selective_state_update_triton(state, u, delta, args["A"], B, C, dt_softplus=True)
    full = selective_scan_naive(torch.cat([args["u"], u[..., None]], -1), torch.cat([args["delta"], delta[..., None]], -1),
                                args["A"], torch.cat([args["B"], B[..., None]], -1),
                                torch.cat([args["C"], C[..., None]], -1), delta_softplus=True)
    within(rel_err(y, full[..., -1]), scan_bound(1, 3))  # fp32, one step on a float64 state
