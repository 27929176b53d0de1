"""Our CPU kernels inside stock transformers models, through transformers' own kernel hook.

transformers (5.x) routes every Mamba op of its Mamba-2-family models (Bamba, Mamba2, NemotronH,
GraniteMoeHybrid, FalconH1, Zamba2; the conv and the decode step of Mamba / FalconMamba too) through a
`kernels` layer named after the mamba-ssm / causal-conv1d function it stands for
(`use_kernel_func_from_hub_with_fallback`). `kernels.kernelize` swaps such a layer's forward for the one that
the registered kernel mapping names for the model's device and mode; `PreTrainedModel.set_use_kernels(True)`
(or `from_pretrained(..., use_kernels=True)`) runs it. We register our functions for the `cpu` device only:

    mamba_chunk_scan_combined   -> dispatch.mamba_chunk_scan_combined (ssd_chunked; its own block size on CPU)
    selective_state_update      -> dispatch.selective_state_update (Mamba-2 and Mamba-1 shapes)
    selective_scan_fn           -> dispatch.selective_scan_fn (the Mamba-1 scan)
    causal_conv1d_fn            -> dispatch.causal_conv1d_fn
    causal_conv1d_update        -> dispatch.causal_conv1d_update

GPU entries stay transformers' own (mamba-ssm from the hub, or the installed packages). With ours, packed
sequences (`seq_idx`) work on CPU; without, transformers refuses them there.

    from distill.kernels.transformers_hook import use_in_transformers
    model = use_in_transformers(AutoModelForCausalLM.from_pretrained(path))   # stock model, our CPU kernels
    model.reset_kernels()                                                        # back to transformers' torch path

The mapping is registered globally, so `model.train()` / `model.eval()` (which re-kernelize) keep it, and any
later `from_pretrained(..., use_kernels=True)` in the process picks it up as well.
"""

import math

import torch

from . import dispatch


def packing(kwargs):
    """seq_idx from the model kwargs transformers passes along; cu_seqlens (varlen final states) is not
    implemented by ours, so it is refused rather than silently ignored."""
    if kwargs.get("cu_seqlens") is not None:
        raise ValueError("distill.kernels does not take cu_seqlens; pass seq_idx (b, l) int32 instead")
    return kwargs.get("seq_idx")


# Each layer's forward has the signature of transformers' torch function that it replaces (kernelize checks the
# number and kinds of its parameters, so a change there fails loudly at kernelize) and calls ours by keyword
# (transformers' order of D / dt_bias / z differs from mamba-ssm's).


class ChunkScan(torch.nn.Module):
    """transformers' mamba2_chunk_scan -> our chunked scan (z and seq_idx come in kwargs)."""

    def forward(self, hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False, **kwargs):
        return dispatch.mamba_chunk_scan_combined(
            hidden_states, dt, A, B, C, chunk_size, D=D, z=kwargs.get("z"), dt_bias=dt_bias,
            initial_states=initial_states, seq_idx=packing(kwargs), dt_softplus=dt_softplus, dt_limit=dt_limit,
            return_final_states=return_final_states)


class StateUpdate(torch.nn.Module):
    """transformers' mamba2 / mamba selective_state_update -> our decode step."""

    def forward(self, state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs):
        return dispatch.selective_state_update(state, hidden_states, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                               dt_softplus=dt_softplus)


class SelectiveScan(torch.nn.Module):
    """transformers' mamba_selective_scan -> our Mamba-1 scan (its mambapy switches do not apply)."""

    def forward(self, hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False, use_mambapy=False, use_associative_scan=False, **kwargs):
        return dispatch.selective_scan_fn(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                          delta_softplus=delta_softplus, return_last_state=return_last_state)


class Conv(torch.nn.Module):
    """transformers' causal_conv1d_fn -> ours (seq_idx comes in kwargs)."""

    def forward(self, hidden_states, weight, bias=None, activation=None, **kwargs):
        return dispatch.causal_conv1d_fn(hidden_states, weight, bias, seq_idx=packing(kwargs), activation=activation)


class ConvUpdate(torch.nn.Module):
    """transformers' causal_conv1d_update -> ours (a shifting conv state, as transformers keeps it)."""

    def forward(self, hidden_states, conv_state, weight, bias=None, activation=None):
        return dispatch.causal_conv1d_update(hidden_states, conv_state, weight, bias, activation=activation)


# transformers' layer name (the mamba-ssm / causal-conv1d function it stands for) -> our layer
LAYERS = {
    "mamba_chunk_scan_combined": ChunkScan,
    "selective_state_update": StateUpdate,
    "selective_scan_fn": SelectiveScan,
    "causal_conv1d_fn": Conv,
    "causal_conv1d_update": ConvUpdate,
}


class OurKernel:
    """A `kernels` repository (its `RepositoryProtocol`: `load()` returns the layer class) for one of our ops."""

    def __init__(self, name):
        self.name = name

    def load(self):
        return LAYERS[self.name]

    def __str__(self):
        return f"distill.kernels {self.name}"


REPOSITORIES = {name: OurKernel(name) for name in LAYERS}


def kernel_mapping():
    """Our entries for `kernels.register_kernel_mapping`: each op on the `cpu` device, every mode."""
    return {name: {"cpu": repo} for name, repo in REPOSITORIES.items()}


def use_in_transformers(model):
    """Make a stock transformers model (on CPU) run our scan, decode step and conv; returns the model.

    Registers our CPU mapping with `kernels` (merged into the current one) and kernelizes the model through
    transformers' `set_use_kernels(True)`. A model that ends up with none of our ops (no Mamba layers, or on a GPU,
    where transformers' own mapping applies) is reset to how it was, so this is safe to call on any model."""
    from kernels import register_kernel_mapping

    register_kernel_mapping(kernel_mapping())
    model.set_use_kernels(True)
    if not ops_in_use(model):
        model.reset_kernels()
    return model


def ops_in_use(model):
    """The names of our ops that the model's kernel layers run now (kernels' `get_kernelized_layers`)."""
    from kernels import get_kernelized_layers

    funcs = get_kernelized_layers(model).funcs.values()
    return {func.repo.name for func in funcs if isinstance(func.repo, OurKernel)}
