"""The hybrid student: the teacher (a Llama, Mistral, Qwen2, Qwen3 or SmolLM3) with a Mamba mixer in some layers.

Attention layers, MLPs, norms and the rotary embedding are transformers' own classes of the teacher's family
(`FAMILIES`, picked by `config.teacher_model_type`: same names, same sdpa path, same masks, and the family's
q/k/v biases, Qwen3's q_norm/k_norm, sliding windows and SmolLM3's NoPE layers), so a hybrid without Mamba
layers is the teacher. Each Mamba layer keeps the block's `input_layernorm`, `post_attention_layernorm` and
`mlp` and swaps `self_attn` for `mamba`, fed the same normed hidden states.

Notation: nh heads, nkv kv-heads, hd head_dim, r = nh / nkv, d_inner = nh*hd, d_xb = nkv*hd, u the mixer input,
n = Mamba-2's d_state (`mamba2_d_state`, hd by default).

Mamba-2 mixer (`HybridMamba2Mixer`, "Mamba2InLlama")::

    [z | x | B | C | dt] = in_proj(u)                 widths nh*hd | nkv*hd | nkv*n | nh*n | nh
    [x | B | C] = silu(causal_conv1d([x | B | C]))     depthwise, width d_conv, with bias
    x, B <- repeated per head as GQA repeats K/V: head h reads kv-group h // r
    dt_h = softplus(dt_h + dt_bias_h),  A_h = -exp(A_log_h)       (scalar per head; A in fp32)
    S_t^h = exp(dt_h A_h) S_{t-1}^h + dt_h x_t^h (B_t^h)^T        S^h is hd x n (headdim hd, d_state n)
    y_t^h = S_t^h C_t^h + D_h x_t^h
    out = out_proj(rmsnorm_per_head(y * silu(z)) * norm.weight)

At initialisation from the teacher C, B, x come from q_proj, k_proj, v_proj and out_proj from o_proj, so
C.B plays the role of q.k (linear attention without softmax) and the state accumulates values. With n > hd,
q and k fill the first hd of each head's n channels and C's other channels start at zero, so the mixer starts
computing what it computes with n = hd, and the extra state is there to be learned.
Two options follow the teacher's attention (both mixers): `mamba_proj_bias` gives in_proj and out_proj biases
(for q/k/v biases), and `mamba_bc_norm` applies a per-head RMSNorm to in_proj's B and C rows before the conv,
`B_norm` and `C_norm` (n weights, shared by the heads), where Qwen3 applies k_norm and q_norm.

Mamba-1 mixer (`HybridMamba1Mixer`, MambaInLlama's `Mamba`), n = d_state (hd by default), k = dt_rank::

    [z | x | B | C | dt] = in_proj(u)                 widths nh*hd | nkv*hd | nkv*hd | nh*hd | k
    channels come in groups of n: x and B hold nkv*hd/n groups, z, C and the SSM nh*hd/n; group g reads g // r
    x, B <- repeated per group to nh*hd (x) and nh*hd/n groups (B), as GQA repeats K/V
    x = silu(causal_conv1d(x))                        depthwise over nh*hd channels, width d_conv, with bias
    dt = softplus(dt_proj(dt))                        rank-k time step from the layer input u; dt_proj has a bias
    channel c of group g = c // n:
    s_t^c = exp(dt_t^c A^c) * s_{t-1}^c + dt_t^c x_t^c B_t^g,   A^c = -exp(A_log[c]) in R^n (fp32)
    y_t^c = <s_t^c, C_t^g> + D_c x_t^c
    out = out_proj(y * silu(z))

With n = hd a group is an attention head (C^h from Q, B from K's kv-head, as GQA); MambaInLlama's released
Mamba-1 models use n = 16 < hd, which the same equations cover. Unlike mamba-ssm's Mamba, dt is computed from
u (MambaInLlama's `dt_proj_down`, here the last k rows of `in_proj`), not from the conv output.

Padding never reaches the state: x (before and after the conv) and dt are zeroed where the 2D
`attention_mask` is 0 (dt = 0 means no decay and no input; Mamba-2 zeroes B and C with x). Documents packed
into one row (`position_ids` restarting) reset the state: Mamba-2 passes mamba-ssm's `seq_idx` (the same
document split transformers' masks use) to the conv and the scan; Mamba-1's `selective_scan_fn` has no
`seq_idx`, so its packed rows are moved into one row per document first.

The cache is transformers' `DynamicCache(config)`: `config.layer_types` marks Mamba layers "linear_attention",
so they get a conv state (b, conv channels, d_conv) and an fp32 SSM state (Mamba-2: (b, nh, hd, n); Mamba-1:
(b, nh*hd/n, n, n)). The prefill stores the final states; each decode step is one `causal_conv1d_update` plus one
`selective_state_update` per Mamba layer, O(1) in the sequence length.

Speculative decoding (`generate(assistant_model=...)` in either role, `prompt_lookup_num_tokens=`) follows
transformers' contract for recurrent caches: `generate` calls `cache.activate_past_recording(k)`, and while the
cache records, each Mamba layer hands it the conv inputs (kept until `crop`) and the SSM state after each of the
forward's last tokens (all of a continuation's, the last k + 1 of a prefill); `cache.crop(-r)` restores the
state r tokens back. Mamba-2 gets those states from one batched sum over the tokens (`ssd_states`), so verifying
k drafts is one forward, not k steps; Mamba-1 steps through them (its scan cannot start from a state).

This file imports only torch/transformers (plus the kernels, whose files are copied next to it by
`write_remote_code`), so checkpoints load with `trust_remote_code=True` without mamba-distill installed.
"""

import math
import shutil
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import (
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.smollm3 import modeling_smollm3
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_hybrid import HybridConfig

try:
    from distill.kernels import dispatch as _dispatch
    from distill.kernels.dispatch import (
        causal_conv1d_fn,
        causal_conv1d_update,
        mamba_chunk_scan_combined,
        rmsnorm_fn,
        selective_scan_fn,
        selective_state_update,
    )

    KERNELS_DIR = Path(_dispatch.__file__).parent
except ImportError:  # remote code: the kernels' files were copied next to this one
    from .dispatch import (
        causal_conv1d_fn,
        causal_conv1d_update,
        mamba_chunk_scan_combined,
        rmsnorm_fn,
        selective_scan_fn,
        selective_state_update,
    )

    KERNELS_DIR = Path(__file__).parent


class Family(NamedTuple):
    """A teacher family's transformers modules, which the hybrid's attention layers and blocks reuse."""

    attention: type[nn.Module]
    mlp: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]


def _family(module, prefix: str) -> Family:
    return Family(*(getattr(module, prefix + part) for part in ("Attention", "MLP", "RMSNorm", "RotaryEmbedding")))


FAMILIES = {  # keys: families.TEACHER_MODEL_TYPES
    "llama": _family(modeling_llama, "Llama"),
    "mistral": _family(modeling_mistral, "Mistral"),
    "qwen2": _family(modeling_qwen2, "Qwen2"),
    "qwen3": _family(modeling_qwen3, "Qwen3"),
    "smollm3": _family(modeling_smollm3, "SmolLM3"),
}


def is_mixer_param(name: str) -> bool:
    """Whether a parameter or state-dict name belongs to a Mamba mixer (a decoder layer's `mamba`)."""
    return ".mamba." in f".{name}"


def repeat_heads(x: torch.Tensor, groups: int, repeats: int) -> torch.Tensor:
    """(..., groups * d) -> (..., groups * repeats * d), each group repeated in place (GQA's repeat_kv)."""
    if repeats == 1:
        return x
    *lead, width = x.shape
    x = x.view(*lead, groups, 1, width // groups).expand(*lead, groups, repeats, width // groups)
    return x.reshape(*lead, groups * repeats * (width // groups))


def seq_idx_from_positions(position_ids: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    """mamba-ssm's `seq_idx` (int32, one id per packed document), or None when no row packs documents.

    transformers' own split (a new document wherever the position does not grow by one), so the Mamba layers
    reset exactly where the attention layers' packed-sequence mask starts a new block.
    """
    if position_ids is None:
        return None
    seq_idx = find_packed_sequence_indices(position_ids.expand(batch_size, -1))
    return None if seq_idx is None else seq_idx.to(torch.int32)


def padding_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """The (batch, seq_len) columns of the 2D 0/1 padding mask that belong to this forward (None: no mask)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"the Mamba mixer takes the 2D (batch, seq) padding mask, got a {attention_mask.dim()}D mask; "
            "pass the batch's attention_mask (or None), not the attention layers' causal mask"
        )
    return attention_mask[:, -seq_len:]


def last_conv_window(x: torch.Tensor, width: int, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """The conv state after x (b, c, l): its last `width` inputs, zero where they precede the last document."""
    if x.shape[-1] < width:
        x = F.pad(x, (width - x.shape[-1], 0))
        if seq_idx is not None:
            seq_idx = F.pad(seq_idx, (width - seq_idx.shape[-1], 0), value=-1)
    window = x[..., -width:]
    if seq_idx is not None:
        same_doc = seq_idx[:, -width:] == seq_idx[:, -1:]
        window = window * same_doc[:, None, :].to(window.dtype)
    return window.contiguous()


def recorded_conv(cache: Cache, layer_idx: int, conv: nn.Conv1d, inputs: torch.Tensor) -> torch.Tensor:
    """silu(conv) over this forward's inputs (b, c, l), while the cache records its past for `crop`.

    The cache keeps every conv input since the last `crop` and returns them before this forward's, so the conv
    sees the right left context and a later `crop(-r)` keeps the window that ends r tokens earlier.
    """
    full = cache.update_conv_state(inputs, layer_idx, conv_kernel_size=conv.kernel_size[0])
    out = causal_conv1d_fn(full.to(inputs.dtype), conv.weight.squeeze(1), conv.bias, activation="silu")
    return out[..., -inputs.shape[-1] :]


def states_to_record(cache: Cache, layer_idx: int, seq_len: int, continuing: bool) -> int:
    """How many of this forward's last tokens get their SSM state recorded, so `crop` can roll back to them.

    A prefill needs the ones `generate` may reject (`recurrent_states_to_keep`, the draft length), and one more
    whose state is the start of the rest. A forward that continues a cache is a draft being verified or written:
    all of its tokens, because the draft length (`num_assistant_tokens`) may have grown since recording began.
    """
    if continuing:
        return seq_len
    return min(seq_len, (cache.get_recurrent_states_to_keep(layer_idx) or 0) + 1)


def ssd_states(state: torch.Tensor, x: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, A: torch.Tensor):
    """The Mamba-2 state after each of m tokens, from `state`, in one batched sum instead of m steps (fp32).

    state (b, h, p, n); x (b, m, h, p); B (b, m, h, n); dt (b, m, h); A (h,). Returns (b, m, h, p, n):
    S_j = exp(a_1 + ... + a_j) S_0 + sum_{i <= j} exp(a_{i+1} + ... + a_j) dt_i x_i B_i^T, with a_i = dt_i A.
    """
    cum = (dt * A).cumsum(dim=1)  # (b, m, h)
    m = x.shape[1]
    causal = torch.ones(m, m, dtype=torch.bool, device=x.device).tril()
    gap = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal[None, :, :, None], -math.inf)  # (b, j, i, h)
    inputs = torch.einsum("bjih,bih,bihp,bihn->bjhpn", gap.exp(), dt, x.float(), B.float())
    return cum.exp()[..., None, None] * state[:, None] + inputs


def norm_heads(norm: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A per-head norm (Qwen3's q_norm / k_norm) applied to (..., heads * head_dim)."""
    return norm(x.unflatten(-1, (-1, head_dim))).flatten(-2)


def inverse_softplus(dt: torch.Tensor) -> torch.Tensor:
    return dt + torch.log(-torch.expm1(-dt))


def sample_dt(size: int, config: HybridConfig, device) -> torch.Tensor:
    """Initial time steps, log-uniform in [dt_min, dt_max] and floored (Mamba's initialisation)."""
    low, high = math.log(config.dt_min), math.log(config.dt_max)
    dt = torch.exp(torch.rand(size, device=device) * (high - low) + low)
    return dt.clamp(min=config.dt_init_floor)


class HybridRMSNormGated(nn.Module):
    """rmsnorm(x * silu(z)) * weight, normalised per group of `group_size` channels (one group per head)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return rmsnorm_fn(
            hidden_states, self.weight, None, z=gate, eps=self.variance_epsilon,
            group_size=self.group_size, norm_before_gate=False,
        )


class HybridMamba2Mixer(nn.Module):
    """Mamba-2 with attention's shapes: nh heads of size hd, B and x at kv width (see the module docstring)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.d_state = config.mamba2_d_state
        self.d_conv = config.d_conv
        self.chunk_size = config.chunk_size
        self.d_inner = self.num_heads * self.head_dim
        self.d_xb = self.num_kv_heads * self.head_dim
        self.widths = [self.d_xb, self.num_kv_heads * self.d_state, self.num_heads * self.d_state]  # x, B, C
        self.conv_dim = sum(self.widths)

        bias = config.mamba_proj_bias
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=bias)
        self.bc_norm = config.mamba_bc_norm
        if self.bc_norm:
            self.B_norm = modeling_llama.LlamaRMSNorm(self.d_state, eps=config.rms_norm_eps)
            self.C_norm = modeling_llama.LlamaRMSNorm(self.d_state, eps=config.rms_norm_eps)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, padding=self.d_conv - 1, bias=True
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = HybridRMSNormGated(self.d_inner, group_size=self.head_dim, eps=config.mamba_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=bias)

    def _project(self, hidden_states: torch.Tensor):
        """z, [x | B | C] (B and C normed per head with `mamba_bc_norm`) and dt, from in_proj."""
        z, xbc, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        if self.bc_norm:
            x, B, C = xbc.split(self.widths, dim=-1)
            B, C = norm_heads(self.B_norm, B, self.d_state), norm_heads(self.C_norm, C, self.d_state)
            xbc = torch.cat([x, B, C], dim=-1)
        return z, xbc, dt

    def _split_xbc(self, xbc: torch.Tensor):
        """[x | B | C] -> x (..., nh, hd), B repeated to nh heads and C, each (..., nh, n)."""
        x, B, C = xbc.split(self.widths, dim=-1)
        repeats = self.num_heads // self.num_kv_heads
        x = repeat_heads(x, self.num_kv_heads, repeats)
        B = repeat_heads(B, self.num_kv_heads, repeats)
        heads = (*xbc.shape[:-1], self.num_heads)
        return x.view(*heads, self.head_dim), B.view(*heads, self.d_state), C.reshape(*heads, self.d_state)

    def _scan_inputs(self, xbc: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor | None):
        """x, B, C per head, the fp32 time step and A for the scan; padded positions get x = B = C = dt = 0."""
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if mask is not None:
            xbc = xbc * mask[..., None].to(xbc.dtype)
            dt = dt * mask[..., None]
        x, B, C = self._split_xbc(xbc)
        return x, B, C, dt, -torch.exp(self.A_log.float())

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        if cache is not None and cache.is_recording_past(self.layer_idx):
            return self._forward_recorded(hidden_states, padding_mask(attention_mask, seq_len), position_ids, cache)
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        ssm_state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        if conv_state is not None and seq_len == 1:
            return self.step(hidden_states, conv_state, ssm_state)

        mask = padding_mask(attention_mask, seq_len)
        seq_idx = seq_idx_from_positions(position_ids, batch)
        z, xbc, dt = self._project(hidden_states)
        if mask is not None:
            xbc = xbc * mask[..., None].to(xbc.dtype)

        # Continuing from a cache: the conv sees its last inputs first; they belong to the first document.
        conv_input, conv_seq_idx = xbc, seq_idx
        if conv_state is not None:
            conv_input = torch.cat([conv_state.transpose(1, 2).to(xbc.dtype), xbc], dim=1)
            if seq_idx is not None:
                conv_seq_idx = F.pad(seq_idx, (self.d_conv, 0), value=0)
        conv_input = conv_input.transpose(1, 2)  # (b, c, l), channel-last in memory as causal-conv1d's seq_idx wants
        if cache is not None:
            window = last_conv_window(conv_input, self.d_conv, conv_seq_idx)
            cache.update_conv_state(window, self.layer_idx, conv_kernel_size=self.d_conv)
        xbc = causal_conv1d_fn(
            conv_input, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=conv_seq_idx, activation="silu"
        )[..., -seq_len:].transpose(1, 2)

        x, B, C, dt, A = self._scan_inputs(xbc, dt, mask)
        result = mamba_chunk_scan_combined(
            x, dt, A, B, C, self.chunk_size, D=self.D, initial_states=ssm_state, seq_idx=seq_idx,
            return_final_states=cache is not None,
        )
        if cache is not None:
            y, final_state = result
            cache.update_recurrent_state(final_state.float(), self.layer_idx)  # the state is kept in fp32
        else:
            y = result
        y = self.norm(y.reshape(batch, seq_len, self.d_inner), z)
        return self.out_proj(y.to(hidden_states.dtype))

    def _forward_recorded(self, hidden_states, mask, position_ids, cache: Cache) -> torch.Tensor:
        """A forward whose states `crop` may roll back (speculative decoding: drafting or verifying).

        transformers' contract for recurrent caches: the conv inputs and the SSM state after each of the last
        tokens are handed to the cache, which keeps them until `crop`. The tokens before those (a prompt) go
        through the chunked scan; the recorded ones get their states from one batched sum (`ssd_states`), not
        one decode step each, and their outputs from those states.
        """
        batch, seq_len, _ = hidden_states.shape
        if seq_idx_from_positions(position_ids, batch) is not None:
            raise ValueError("packed documents cannot be decoded speculatively: pass one document per row")
        ssm_state = cache.get_recurrent_state(self.layer_idx)
        keep = states_to_record(cache, self.layer_idx, seq_len, continuing=ssm_state is not None)
        z, xbc, dt = self._project(hidden_states)
        if mask is not None:
            xbc = xbc * mask[..., None].to(xbc.dtype)
        xbc = recorded_conv(cache, self.layer_idx, self.conv1d, xbc.transpose(1, 2)).transpose(1, 2)
        x, B, C, dt, A = self._scan_inputs(xbc, dt, mask)

        head = seq_len - keep
        outputs, recorded = [], []
        if head > 0:
            y, ssm_state = mamba_chunk_scan_combined(
                x[:, :head], dt[:, :head], A, B[:, :head], C[:, :head], self.chunk_size, D=self.D,
                initial_states=ssm_state, return_final_states=True,
            )
            outputs.append(y)
            recorded.append(ssm_state.float())
        if ssm_state is None:
            ssm_state = x.new_zeros(batch, self.num_heads, self.head_dim, self.d_state, dtype=torch.float32)
        states = ssd_states(ssm_state, x[:, head:], B[:, head:], dt[:, head:], A)  # (b, keep, h, p, n)
        y = torch.einsum("bjhpn,bjhn->bjhp", states, C[:, head:].float()) + self.D.float()[:, None] * x[:, head:]
        outputs.append(y.to(x.dtype))
        recorded.extend(states.unbind(dim=1))
        cache.update_recurrent_state(recorded, self.layer_idx)
        y = self.norm(torch.cat(outputs, dim=1).reshape(batch, seq_len, self.d_inner), z)
        return self.out_proj(y.to(hidden_states.dtype))

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One decode step; updates the cached conv and SSM states in place."""
        z, xbc, dt = self._project(hidden_states[:, 0])
        xbc = causal_conv1d_update(
            xbc, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"
        )
        x, B, C = self._split_xbc(xbc)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        hd = self.head_dim
        y = selective_state_update(
            ssm_state, x, dt[..., None].expand(-1, -1, hd), A[:, None, None].expand(-1, hd, self.d_state), B, C,
            D=self.D[:, None].expand(-1, hd),
        )
        y = self.norm(y.reshape(-1, 1, self.d_inner), z[:, None])
        return self.out_proj(y.to(hidden_states.dtype))


class HybridMamba1Mixer(nn.Module):
    """Mamba-1 with attention's shapes (MambaInLlama): x from V, B from K, C from Q, in groups of d_state."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_state = config.mamba1_d_state
        self.d_conv = config.d_conv
        self.dt_rank = config.mamba1_dt_rank
        self.d_inner = config.num_attention_heads * config.head_dim
        self.d_xb = config.num_key_value_heads * config.head_dim
        if self.d_xb % self.d_state:
            raise ValueError(
                f"mamba1_d_state = {self.d_state} must divide num_key_value_heads * head_dim = {self.d_xb} "
                f"(x and B are read in groups of d_state); use a divisor such as head_dim = {config.head_dim}"
            )
        self.num_groups = self.d_inner // self.d_state  # channel c reads B and C of group c // d_state
        self.repeats = self.d_inner // self.d_xb
        self.splits = [self.d_inner, self.d_xb, self.d_xb, self.d_inner, self.dt_rank]

        self.head_dim = config.head_dim
        self.in_proj = nn.Linear(config.hidden_size, sum(self.splits), bias=config.mamba_proj_bias)
        self.bc_norm = config.mamba_bc_norm
        if self.bc_norm:
            self.B_norm = modeling_llama.LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.C_norm = modeling_llama.LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1, bias=True
        )
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.mamba_proj_bias)

    def _project(self, hidden_states: torch.Tensor):
        """z, x and B (repeated to d_inner), C, and the fp32 time step dt, all (..., d_inner)."""
        z, x, B, C, dt = self.in_proj(hidden_states).split(self.splits, dim=-1)
        if self.bc_norm:  # per attention head, before B and C are read in groups of d_state
            B, C = norm_heads(self.B_norm, B, self.head_dim), norm_heads(self.C_norm, C, self.head_dim)
        kv_groups = self.d_xb // self.d_state
        x, B = repeat_heads(x, kv_groups, self.repeats), repeat_heads(B, kv_groups, self.repeats)
        return z, x, B, C, F.softplus(self.dt_proj(dt).float())

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        mask = padding_mask(attention_mask, seq_len)
        seq_idx = seq_idx_from_positions(position_ids, batch)
        if cache is not None and cache.is_recording_past(self.layer_idx):
            if seq_idx is not None:
                raise ValueError("packed documents cannot be decoded speculatively: pass one document per row")
            return self._forward_recorded(hidden_states, mask, cache)
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        if conv_state is not None:
            # selective_scan_fn cannot start from a state: continue token by token (O(1) each).
            return self._continue(hidden_states, mask, seq_idx, conv_state, cache.get_recurrent_state(self.layer_idx))
        if seq_idx is None:
            out, conv_window, ssm_state = self._scan(hidden_states, mask)
        else:
            out, conv_window, ssm_state = self._scan_documents(hidden_states, mask, seq_idx)
        if cache is not None:
            cache.update_conv_state(conv_window, self.layer_idx, conv_kernel_size=self.d_conv)
            cache.update_recurrent_state(ssm_state.float(), self.layer_idx)  # the state is kept in fp32
        return out

    def _scan(self, hidden_states: torch.Tensor, mask: torch.Tensor | None):
        """Parallel scan from a zero state; returns the output and the final conv and SSM states."""
        z, x, B, C, dt = self._project(hidden_states)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        x = x.transpose(1, 2)
        conv_window = last_conv_window(x, self.d_conv, None)
        x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
            dt = dt * mask[..., None]
        y, ssm_state = self._selective_scan(x, dt, B, C, z)
        return self.out_proj(y.to(hidden_states.dtype)), conv_window, ssm_state

    def _selective_scan(self, x, dt, B, C, z):
        """The scan from a zero state over conv outputs x (b, d_inner, l) and the rest (b, l, ...) from
        `_project`: y (b, l, d_inner) and the final SSM state (b, groups, d_state, d_state)."""
        batch, seq_len = dt.shape[:2]
        B = B.view(batch, seq_len, self.num_groups, self.d_state).permute(0, 2, 3, 1)
        C = C.view(batch, seq_len, self.num_groups, self.d_state).permute(0, 2, 3, 1)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = selective_scan_fn(  # mamba-ssm's CUDA scan wants delta in u's dtype
            x, dt.transpose(1, 2).to(x.dtype), A, B.contiguous(), C.contiguous(), D=self.D.float(),
            z=z.transpose(1, 2), return_last_state=True,
        )
        return y.transpose(1, 2), ssm_state.view(batch, self.num_groups, self.d_state, self.d_state)

    def _forward_recorded(self, hidden_states, mask, cache: Cache) -> torch.Tensor:
        """A forward whose states `crop` may roll back (speculative decoding: drafting or verifying).

        transformers' contract for recurrent caches: the conv inputs and the SSM state after each of the last
        tokens go to the cache, which keeps them until `crop`. A prompt's earlier tokens go through the parallel
        scan; the recorded ones are decode steps (`selective_scan_fn` cannot start from a state), each state kept.
        """
        batch, seq_len, _ = hidden_states.shape
        ssm_state = cache.get_recurrent_state(self.layer_idx)
        keep = states_to_record(cache, self.layer_idx, seq_len, continuing=ssm_state is not None)
        z, x, B, C, dt = self._project(hidden_states)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        x = recorded_conv(cache, self.layer_idx, self.conv1d, x.transpose(1, 2))
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
            dt = dt * mask[..., None]

        head = seq_len - keep
        outputs, recorded = [], []
        if head > 0:  # a prefill, from the zero state
            y, ssm_state = self._selective_scan(x[..., :head], dt[:, :head], B[:, :head], C[:, :head], z[:, :head])
            outputs.append(y)
            recorded.append(ssm_state.float())
        if ssm_state is None:
            ssm_state = x.new_zeros(batch, self.num_groups, self.d_state, self.d_state, dtype=torch.float32)
        state = ssm_state.clone()  # the cache's own tensor is replaced by `update_recurrent_state`, not stepped
        for t in range(head, seq_len):
            outputs.append(self._state_update(state, x[..., t], dt[:, t], B[:, t], C[:, t], z[:, t])[:, None])
            recorded.append(state.clone())
        cache.update_recurrent_state(recorded, self.layer_idx)
        return self.out_proj(torch.cat(outputs, dim=1).to(hidden_states.dtype))

    def _state_update(self, ssm_state, x, dt, B, C, z) -> torch.Tensor:
        """One token through the SSM (x the conv output, all (b, d_inner)); updates `ssm_state` in place."""
        batch = x.shape[0]
        groups = (batch, self.num_groups, self.d_state)
        A = -torch.exp(self.A_log.float())
        y = selective_state_update(
            ssm_state, x.view(groups), dt.view(groups), A.view(self.num_groups, self.d_state, self.d_state),
            B.view(groups), C.view(groups), D=self.D.view(self.num_groups, self.d_state), z=z.view(groups),
        )
        return y.reshape(batch, self.d_inner)

    def _scan_documents(self, hidden_states: torch.Tensor, mask: torch.Tensor | None, seq_idx: torch.Tensor):
        """`_scan` over packed rows: one row per document (right-aligned, left-padded), then packed back."""
        batch, seq_len, hidden = hidden_states.shape
        starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True).flatten()
        doc = starts.cumsum(0) - 1
        lengths = torch.bincount(doc)
        flat = torch.arange(batch * seq_len, device=doc.device)
        width = int(lengths.max())
        column = width - lengths[doc] + flat - flat[starts][doc]
        docs = hidden_states.new_zeros(len(lengths), width, hidden)
        docs[doc, column] = hidden_states.reshape(-1, hidden)
        doc_mask = hidden_states.new_zeros(len(lengths), width)
        doc_mask[doc, column] = 1.0 if mask is None else mask.reshape(-1).to(doc_mask.dtype)
        out, conv_window, ssm_state = self._scan(docs, doc_mask)
        last = doc.view(batch, seq_len)[:, -1]
        return out[doc, column].view(batch, seq_len, -1), conv_window[last], ssm_state[last]

    def _continue(self, hidden_states, mask, seq_idx, conv_state, ssm_state) -> torch.Tensor:
        """Tokens after a cached state, one `step` each; padding keeps the state, a new document resets it."""
        outputs = []
        for t in range(hidden_states.shape[1]):
            if seq_idx is not None and t > 0:
                same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(ssm_state.dtype)
                conv_state.mul_(same[:, None, None].to(conv_state.dtype))
                ssm_state.mul_(same[:, None, None, None])
            keep = None if mask is None else mask[:, t]
            outputs.append(self.step(hidden_states[:, t : t + 1], conv_state, ssm_state, keep))
        return torch.cat(outputs, dim=1)

    def step(self, hidden_states, conv_state, ssm_state, keep: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step; updates the cached conv and SSM states in place (not where `keep` is 0)."""
        batch = hidden_states.shape[0]
        z, x, B, C, dt = self._project(hidden_states[:, 0])
        if keep is not None:
            x = x * keep[:, None].to(x.dtype)
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        if keep is not None:
            x = x * keep[:, None].to(x.dtype)
            dt = dt * keep[:, None]
        y = self._state_update(ssm_state, x, dt, B, C, z)
        return self.out_proj(y.reshape(batch, 1, self.d_inner).to(hidden_states.dtype))


MIXERS = {"mamba2": HybridMamba2Mixer, "mamba1": HybridMamba1Mixer}


class HybridDecoderLayer(GradientCheckpointingLayer):
    """The teacher family's block whose mixer is `self_attn` (the family's attention) or `mamba` (a Mamba mixer)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        family = FAMILIES[config.teacher_model_type]
        self.mixer_type = config.mixer_types[layer_idx]
        if self.mixer_type == "attention":
            self.self_attn = family.attention(config, layer_idx)
        else:
            self.mamba = MIXERS[self.mixer_type](config, layer_idx)
        self.mlp = family.mlp(config)
        self.input_layernorm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = family.norm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Llama's block signature. For a Mamba layer `attention_mask` is the 2D padding mask (or None)."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.mixer_type == "attention":
            hidden_states, _ = self.self_attn(
                hidden_states=hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        else:
            hidden_states = self.mamba(
                hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache
            )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["HybridDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _is_stateful = True
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["A_log"]  # so that exp(dt * A) cannot underflow
    _can_record_outputs: ClassVar[dict] = {
        "hidden_states": HybridDecoderLayer,
        "attentions": tuple(family.attention for family in FAMILIES.values()),
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """Llama's init, then Mamba's for the mixers' own parameters (seeded by torch's RNG)."""
        super()._init_weights(module)
        if isinstance(module, (HybridMamba2Mixer, HybridMamba1Mixer)):
            # PyTorch's default conv init (as in mamba-ssm): a 0.02-std conv would mute the copied x, B, C.
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.d_conv)
            init.uniform_(module.conv1d.bias, -bound, bound)
        if isinstance(module, HybridMamba2Mixer):
            low, high = self.config.A_init_range
            A = torch.empty(module.num_heads, device=module.A_log.device).uniform_(low, high)
            init.copy_(module.A_log, torch.log(A))
            init.copy_(module.dt_bias, inverse_softplus(sample_dt(module.num_heads, self.config, A.device)))
            init.ones_(module.D)
        elif isinstance(module, HybridMamba1Mixer):
            bound = module.dt_rank**-0.5
            init.uniform_(module.dt_proj.weight, -bound, bound)
            init.copy_(module.dt_proj.bias, inverse_softplus(sample_dt(module.d_inner, self.config, module.D.device)))
            A = torch.arange(1, module.d_state + 1, dtype=torch.float32, device=module.A_log.device)
            init.copy_(module.A_log, torch.log(A).expand(module.d_inner, -1))
            init.ones_(module.D)


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        family = FAMILIES[config.teacher_model_type]
        self.norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = family.rotary(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        layer_types = set(self.config.layer_types)
        has_attention = "attention" in self.config.mixer_types
        if position_ids is None:
            # Only attention layers count cached tokens; positions matter to nothing else. Ask an attention layer
            # (a sliding one counts every token too): a Mamba layer's cache counts the conv windows it was given
            # (transformers >= 5.25), not tokens.
            past_seen_tokens = (
                cache.get_seq_length(self.config.mixer_types.index("attention"))
                if cache is not None and has_attention
                else 0
            )
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        mask_functions = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
            "linear_attention": create_recurrent_attention_mask,
        }
        masks = {kind: mask_functions[kind](**mask_kwargs) for kind in layer_types}

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer_type],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save (safetensors + config with `auto_map`), plus the code to load it remotely."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)


def write_remote_code(directory) -> None:
    """Copy the config, modeling and kernel files into a checkpoint folder, for `trust_remote_code=True`."""
    directory = Path(directory)
    here = Path(__file__).parent
    files = ("configuration_hybrid.py", "families.py", "modeling_hybrid.py")
    for source in [*(here / name for name in files), *KERNELS_DIR.glob("*.py")]:
        if source.name != "__init__.py" and source.resolve() != (directory / source.name).resolve():
            shutil.copyfile(source, directory / source.name)


__all__ = ["HybridForCausalLM", "HybridModel", "HybridPreTrainedModel", "write_remote_code"]

if __name__ == "distill.modeling_hybrid":  # our package; transformers registers a remote-code copy from its auto_map
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
    AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
