"""MambaInLlama import: a synthetic checkpoint in their layout -> our native model -> same function.

The reference is written here from MambaInLlama's own equations (mamba2/ and mamba/hybrid_mamba_layer.py,
hybrid_model.py): a Llama whose non-attention layers are swapped for their Mamba-2 or Mamba-1
layers, run as a naive per-timestep loop in float64. It shares no code with `distill`.
"""

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tolerances import summed, within
from torch import nn

from distill.errors import UserError
from tests.conftest import tiny_llama_config

ATTENTION = [1, 3]


def causal_depthwise_conv(x, weight, bias):
    """x (L, C), weight (C, 1, K), bias (C): out[t, c] = bias[c] + sum_k weight[c, 0, k] * x[t - K + 1 + k, c]."""
    length, (channels, _, width) = x.shape[0], weight.shape
    padded = torch.cat([x.new_zeros(width - 1, channels), x])
    return torch.stack([bias + (padded[t : t + width].T * weight[:, 0]).sum(-1) for t in range(length)])


def repeat_groups(x, group_size, repeats):
    """(L, G * group_size) -> (L, G * repeats * group_size), GQA-style: group g feeds outputs g*repeats..."""
    length = x.shape[0]
    return x.view(length, -1, 1, group_size).expand(-1, -1, repeats, -1).reshape(length, -1)


class MILMamba2(nn.Module):
    """MambaInLlama's Mamba2 (repeat_kv_before_conv=False, rmsnorm=True, norm_before_gate=False, D per head)."""

    def __init__(self, p, d_inner, d_xb, d_state):
        super().__init__()
        self.p, self.d_inner, self.d_xb, self.d_state = p, d_inner, d_xb, d_state

    def forward(self, u):
        p, n = self.p, self.d_state
        heads = self.d_inner // n
        outputs = []
        for seq in u:
            z, xbc, dt = (seq @ p["in_proj.weight"].T).split(
                [self.d_inner, self.d_inner + 2 * self.d_xb, heads], -1
            )
            xbc = F.silu(causal_depthwise_conv(xbc, p["conv1d.weight"], p["conv1d.bias"]))
            x, B, C = xbc.split([self.d_xb, self.d_xb, self.d_inner], -1)
            x = repeat_groups(x, n, self.d_inner // self.d_xb).view(-1, heads, n)
            B = repeat_groups(B, n, self.d_inner // self.d_xb).view(-1, heads, n)
            C = C.view(-1, heads, n)
            dt = F.softplus(dt + p["dt_bias"])
            A = -torch.exp(p["A_log"])
            state = seq.new_zeros(heads, n, n)  # (head, headdim p, state n)
            ys = []
            for t in range(seq.shape[0]):
                decay = torch.exp(dt[t] * A)[:, None, None]
                state = decay * state + dt[t][:, None, None] * x[t][:, :, None] * B[t][:, None, :]
                ys.append((state @ C[t][:, :, None])[..., 0] + p["D"][:, None] * x[t])
            y = torch.stack(ys).reshape(-1, self.d_inner) * F.silu(z)
            groups = y.view(-1, heads, n)
            y = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)
            outputs.append((y.reshape(-1, self.d_inner) * p["norm.weight"]) @ p["out_proj.weight"].T)
        return torch.stack(outputs)


class MILMamba1(nn.Module):
    """MambaInLlama's Mamba (Mamba-1): dt from the layer input, its bias added twice, groups of d_state."""

    def __init__(self, p, d_inner, d_xb, d_state):
        super().__init__()
        self.p, self.d_inner, self.d_xb, self.d_state = p, d_inner, d_xb, d_state

    def forward(self, u):
        p, n, repeats = self.p, self.d_state, self.d_inner // self.d_xb
        outputs = []
        for seq in u:
            if "in_proj.weight" in p:  # their inference code's fused projection
                z, x, B, C, dt = (seq @ p["in_proj.weight"].T).split(
                    [self.d_inner, self.d_xb, self.d_xb, self.d_inner, p["dt_proj.weight"].shape[1]], -1
                )
            else:
                z, x = seq @ p["in_proj_z.weight"].T, seq @ p["in_proj_x.weight"].T
                B, C, dt = seq @ p["B_proj.weight"].T, seq @ p["C_proj.weight"].T, seq @ p["dt_proj_down.weight"].T
            dt = dt @ p["dt_proj.weight"].T + p["dt_proj.bias"]  # nn.Linear with its bias ...
            dt = F.softplus(dt + p["dt_proj.bias"])  # ... and the scan's delta_bias=dt_proj.bias
            if p["conv1d.weight"].shape[0] == self.d_inner:  # repeat_kv_before_conv
                x = repeat_groups(x, n, repeats)
            x = F.silu(causal_depthwise_conv(x, p["conv1d.weight"], p["conv1d.bias"]))
            if x.shape[1] != self.d_inner:
                x = repeat_groups(x, n, repeats)
            B = repeat_groups(B, n, repeats).view(-1, self.d_inner // n, n)
            C = C.view(-1, self.d_inner // n, n)
            A = -torch.exp(p["A_log"])  # (d_inner, n)
            state = seq.new_zeros(self.d_inner, n)
            ys = []
            for t in range(seq.shape[0]):
                Bt, Ct = B[t].repeat_interleave(n, 0), C[t].repeat_interleave(n, 0)  # channel c -> group c // n
                state = torch.exp(dt[t][:, None] * A) * state + (dt[t] * x[t])[:, None] * Bt
                ys.append((state * Ct).sum(-1) + p["D"] * x[t])
            y = torch.stack(ys) * F.silu(z)
            outputs.append(y @ p["out_proj.weight"].T)
        return torch.stack(outputs)


class MILDecoderLayer(nn.Module):
    """Their MambaDecoderLayer: pre-norm mixer and MLP, Llama norms and MLP."""

    def __init__(self, llama_layer, mixer):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = (
            llama_layer.input_layernorm,
            llama_layer.post_attention_layernorm,
        )
        self.mlp, self.mixer = llama_layer.mlp, mixer

    def forward(self, hidden_states, **kwargs):
        hidden_states = hidden_states + self.mixer(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def randn(generator, *shape, scale=0.2):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def mil_mamba2_weights(generator, d_model, d_inner, d_xb, heads, d_conv=4):
    r = functools.partial(randn, generator)
    return {
        "in_proj.weight": r(2 * d_inner + 2 * d_xb + heads, d_model),
        "conv1d.weight": r(d_inner + 2 * d_xb, 1, d_conv, scale=0.5),
        "conv1d.bias": r(d_inner + 2 * d_xb),
        "dt_bias": r(heads, scale=1.0) - 2,
        "A_log": torch.log(torch.rand(heads, generator=generator, dtype=torch.float64) * 4 + 0.5),
        "D": r(heads, scale=1.0),
        "norm.weight": 1 + r(d_inner),
        "out_proj.weight": r(d_model, d_inner),
    }


def mil_mamba1_weights(generator, d_model, d_inner, d_xb, d_state, dt_rank, layout, d_conv=4):
    """Their Mamba-1 weights: `training` (separate projections, conv at d_inner after the repeat) or
    `inference` (fused in_proj [z, x, B, C, dt] and, with repeat_kv_before_conv=False, the conv at d_xb)."""
    r = functools.partial(randn, generator)
    conv = d_inner if layout == "training" else d_xb
    weights = {
        "in_proj_z.weight": r(d_inner, d_model),
        "in_proj_x.weight": r(d_xb, d_model),
        "B_proj.weight": r(d_xb, d_model),
        "C_proj.weight": r(d_inner, d_model),
        "dt_proj_down.weight": r(dt_rank, d_model),
        "dt_proj.weight": r(d_inner, dt_rank),
        "dt_proj.bias": r(d_inner, scale=1.0) - 2,
        "conv1d.weight": r(conv, 1, d_conv, scale=0.5),
        "conv1d.bias": r(conv),
        "A_log": torch.log(torch.rand(d_inner, d_state, generator=generator, dtype=torch.float64) * 4 + 0.5),
        "D": r(d_inner, scale=1.0),
        "out_proj.weight": r(d_model, d_inner),
    }
    if layout == "inference":
        parts = ("in_proj_z", "in_proj_x", "B_proj", "C_proj", "dt_proj_down")
        weights["in_proj.weight"] = torch.cat([weights.pop(f"{part}.weight") for part in parts])
    return weights


def write_mil_checkpoint(folder, mixer, ssm_cfg=None, storage="safetensors", layout="training"):
    """A MambaInLlama folder (config.json, mamba_config.json, model.safetensors) and its float64 reference."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).double().eval()
    hd, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    d_inner, d_xb, d_model = nh * hd, nkv * hd, config.hidden_size
    ssm_cfg = dict(ssm_cfg or {})
    generator = torch.Generator().manual_seed(1)
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    for i in range(config.num_hidden_layers):
        if i in ATTENTION:
            continue
        layer = reference.model.layers[i]
        if mixer == "mamba2":
            weights = mil_mamba2_weights(generator, d_model, d_inner, d_xb, nh)
            module = MILMamba2(weights, d_inner, d_xb, ssm_cfg["d_state"])
        else:
            d_state = ssm_cfg.get("d_state", 16)
            dt_rank = ssm_cfg.get("dt_rank", math.ceil(d_model / 16))
            weights = mil_mamba1_weights(generator, d_model, d_inner, d_xb, d_state, dt_rank, layout)
            module = MILMamba1(weights, d_inner, d_xb, d_state)
        reference.model.layers[i] = MILDecoderLayer(layer, module)
        state = {k: v for k, v in state.items() if not k.startswith(f"model.layers.{i}.self_attn.")}
        state.update({f"model.layers.{i}.mamba.{k}": v for k, v in weights.items()})
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    weights_fp32 = {k: v.float().contiguous() for k, v in state.items()}
    if storage == "safetensors":
        save_file(weights_fp32, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(weights_fp32, folder / "pytorch_model.bin")
    mamba_config = {
        "d_model": d_model,
        "ssm_cfg": ssm_cfg,
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "d_inner": d_inner,
        "d_xb": d_xb,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "silu",
        "n_layer": config.num_hidden_layers,
        "attn_layers": ATTENTION,
    }
    (folder / "mamba_config.json").write_text(json.dumps(mamba_config, indent=4))
    # The reference computes with exactly the stored (fp32-rounded) weights.
    for module in reference.model.layers:
        if isinstance(module, MILDecoderLayer):
            module.mixer.p = {k: v.float().double() for k, v in module.mixer.p.items()}
    reference.load_state_dict({k: v.float().double() for k, v in reference.state_dict().items()})
    return reference


def fp32_dynamics_error(model, length: int, logits: torch.Tensor, state_in_fp32: bool = False) -> float:
    """How far a float64 hybrid whose mixers round dt (a softplus) and A to fp32 may be from float64 throughout.

    Each term of a scan's state, decay * dt * B * x, then carries dt's relative error (eps for the softplus and
    its rounding) and the decay exp(-z)'s absolute error z * exp(-z) * 2 eps <= 2 eps / e (z's factors A and dt
    each off by eps): (1 + 2/e) eps of the term's magnitude, and the `length` terms' magnitudes add to at most
    `length` times the largest, so summed(length) of the output's scale per Mamba layer; a state stored in
    fp32 at every step (decoding) rounds by eps/2 more per step. As for reordering_bound, each layer's error
    reaches the logits with gain about their scale."""
    layers = sum(kind != "attention" for kind in model.config.mixer_types)
    per_term = (1 + 2 / math.e) + (0.5 if state_in_fp32 else 0.0)
    return layers * per_term * summed(length) * logits.abs().max().item()


def _compare(folder, tmp_path, reference):
    from transformers import AutoModelForCausalLM

    from distill.import_mil import main as import_mil_main

    out = tmp_path / "native"
    assert import_mil_main([str(folder), "--out", str(out)]) == 0
    native = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
        got = native(ids).logits
    # float64 both, but the native mixers take dt and A in fp32; a wrong weight mapping moves the logits O(1)
    within((got - expected).abs().max().item(), fp32_dynamics_error(native, ids.shape[1], expected), "logits")
    assert expected.std() > 0.1  # the layers really transform the input
    return native


@pytest.mark.parametrize("storage", ["safetensors", "bin"])
def test_mamba2_import_matches_reference(tmp_path, storage):
    ssm_cfg = {"d_state": 16, "ngroups": 4, "expand": 1}
    reference = write_mil_checkpoint(tmp_path / "mil", "mamba2", ssm_cfg, storage)
    native = _compare(tmp_path / "mil", tmp_path, reference)
    assert native.config.mixer_types == ["mamba2", "attention", "mamba2", "attention"]
    assert native.config.mamba_norm_eps == 1e-5


@pytest.mark.parametrize(
    ("ssm_cfg", "layout"),
    [
        ({"expand": 1}, "training"),  # their train_hybrid.py's ssm_cfg: d_state 16 (= head_dim here)
        ({"expand": 1, "d_state": 8, "dt_rank": 3}, "training"),  # d_state < head_dim, as on Llama-3 (16 < 128)
        ({"expand": 1, "d_state": 8, "repeat_kv_before_conv": False}, "inference"),  # fused in_proj, conv at d_xb
    ],
    ids=["dstate16", "dstate8", "fused-conv-at-kv-width"],
)
def test_mamba1_import_matches_reference(tmp_path, ssm_cfg, layout):
    reference = write_mil_checkpoint(tmp_path / "mil", "mamba1", ssm_cfg, layout=layout)
    native = _compare(tmp_path / "mil", tmp_path, reference)
    assert native.config.mixer_types == ["mamba1", "attention", "mamba1", "attention"]
    assert native.config.mamba1_d_state == ssm_cfg.get("d_state", 16)


def test_mamba1_import_decodes_like_its_prefill(tmp_path):
    """The imported model's token-by-token decoding (cache) reproduces the reference's parallel logits."""
    from distill.import_mil import mil_to_native

    reference = write_mil_checkpoint(tmp_path / "mil", "mamba1", {"expand": 1, "d_state": 8})
    native = mil_to_native(tmp_path / "mil").double()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(ids).logits
        out = native(ids[:, :4], use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(4, 9):
            out = native(ids[:, t : t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
    # as in _compare, plus the cache keeps the SSM state in fp32
    error = fp32_dynamics_error(native, ids.shape[1], expected, state_in_fp32=True)
    within((torch.cat(logits, dim=1) - expected).abs().max().item(), error, "logits")


def test_mamba1_projection_bias_is_refused(tmp_path):
    from distill.import_mil import import_mil

    write_mil_checkpoint(tmp_path / "mil", "mamba1", {"expand": 1, "proj_x_bias": True})
    with pytest.raises(UserError, match="proj_x_bias"):
        import_mil(tmp_path / "mil", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_option_is_refused(tmp_path):
    write_mil_checkpoint(tmp_path / "mil", "mamba2", {"d_state": 16, "ngroups": 4, "D_has_hdim": True})
    from distill.import_mil import import_mil

    with pytest.raises(UserError, match="D_has_hdim"):
        import_mil(tmp_path / "mil", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_mil_folder(tmp_path):
    from distill.import_mil import import_mil

    with pytest.raises(UserError, match="mamba_config.json"):
        import_mil(tmp_path, tmp_path / "out")
