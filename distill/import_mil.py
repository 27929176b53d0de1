"""Import a MambaInLlama (github.com/jxiw/MambaInLlama) checkpoint into our native hybrid format.

A MambaInLlama folder holds `config.json` (the teacher's Llama config), `mamba_config.json`
(`d_model`, `d_inner`, `d_xb`, `n_layer`, `attn_layers`, `rms_norm_eps`, `ssm_cfg`) and a Llama-keyed
state dict (`model.safetensors`, its shards, or `pytorch_model.bin`) in which every non-attention layer
`N` has `model.layers.N.mamba.*` instead of `self_attn.*`. Their `x`/`B` width `d_xb` is our kv width
nkv*hd and their `d_inner` is nh*hd. Embeddings, `model.norm`, `lm_head`, attention layers and every layer's
norms and `mlp` keep their keys.

Mamba-2 (`mamba2/hybrid_mamba_layer.py`) is names only:

| MambaInLlama                                                   | ours                   |
|----------------------------------------------------------------|------------------------|
| `mamba.in_proj` rows [z, x, B, C, dt]                           | same key, same rows    |
| `mamba.{conv1d,dt_bias,A_log,D,norm,out_proj}`                  | same keys              |

Their gated RMSNorm has a hard-coded eps of 1e-5, which becomes our `mamba_norm_eps`. Options with no
native equivalent (per-channel D, norm before gate, a dt limit, repeat before conv, projection biases, a
d_state other than head_dim) are refused with the option's name; `conv_bias: false` becomes a zero bias.

Mamba-1 (`mamba/hybrid_mamba_layer.py`; d_state n from `ssm_cfg`, default 16, need not be head_dim):

| MambaInLlama                                                     | ours                                  |
|------------------------------------------------------------------|---------------------------------------|
| `mamba.{in_proj_z,in_proj_x,B_proj,C_proj,dt_proj_down}` stacked | `mamba.in_proj` rows [z, x, B, C, dt] |
| `mamba.in_proj` (their inference code, already stacked)          | same                                  |
| `mamba.conv1d` at d_inner (`repeat_kv_before_conv`, default)     | same                                  |
| `mamba.conv1d` at d_xb (inference code, repeat after the conv)   | channels repeated per group of n      |
| `mamba.{dt_proj.weight,A_log,D,out_proj}`                        | same                                  |
| `mamba.dt_proj.bias`                                             | 2 x `dt_proj.bias`                    |

The conv is depthwise, so repeating its channels before it equals repeating its output after it.
The doubled bias is theirs: `dt_proj(...)` adds it and the scan adds it again (`delta_bias` in prefill,
`dt_bias` in `step`), so their time step is softplus(W_up W_down u + 2 b). Projection biases are refused.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from distill.checkpoints import TOKENIZER_FILES, check_out_dir, copy_tokenizer_and_generation_config
from distill.errors import UserError
from distill.files import atomic_dir

MIL_GATED_NORM_EPS = 1e-5  # hard-coded in MambaInLlama's Mamba2 (RMSNormGated(..., eps=1e-5))


def _refuse(folder: Path, what: str) -> UserError:
    return UserError(f"{folder}: {what}; this MambaInLlama checkpoint cannot be imported losslessly")


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files and (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if not files:
        raise UserError(
            f"{folder} has no model.safetensors or pytorch_model.bin; pass the folder MambaInLlama saved"
        )
    state = {}
    for path in files:
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path} is damaged or truncated ({err}); download it again") from None
    return state


def _mixer(state: dict[str, torch.Tensor], layer: int) -> str:
    prefix = f"model.layers.{layer}.mamba."
    if prefix + "dt_bias" in state:
        return "mamba2"
    if prefix + "dt_proj.weight" in state:
        return "mamba1"
    raise UserError(f"layer {layer} is not in attn_layers but has no MambaInLlama Mamba weights ({prefix}*)")


def _check_mamba2(folder: Path, ssm: dict, nh: int, hd: int) -> None:
    unsupported = {
        "D_has_hdim": (ssm.get("D_has_hdim", False), False),
        "rmsnorm": (ssm.get("rmsnorm", True), True),
        "norm_before_gate": (ssm.get("norm_before_gate", False), False),
        "repeat_kv_before_conv": (ssm.get("repeat_kv_before_conv", False), False),
        "bias": (ssm.get("bias", False), False),
        "d_state": (ssm.get("d_state", 128), hd),
        "ngroups": (ssm.get("ngroups", 1), nh),
    }
    for key, (value, needed) in unsupported.items():
        if value != needed:
            raise _refuse(folder, f"ssm_cfg.{key} = {value!r} has no native equivalent (needs {needed!r})")
    if tuple(ssm.get("dt_limit", (0.0, float("inf")))) != (0.0, float("inf")):
        raise _refuse(
            folder, f"ssm_cfg.dt_limit = {ssm['dt_limit']} has no native equivalent (needs no limit)"
        )


def _check_mamba1(folder: Path, ssm: dict, d_model: int, d_xb: int) -> tuple[int, int]:
    """Their Mamba-1's d_state and dt_rank; refuses the options the native mixer has no equivalent for."""
    for key in ("proj_x_bias", "proj_z_bias", "out_proj_bias"):
        if ssm.get(key, False):
            raise _refuse(folder, f"ssm_cfg.{key} = true has no native equivalent (projections have no bias)")
    d_state = ssm.get("d_state", 16)
    if d_xb % d_state:
        raise _refuse(folder, f"ssm_cfg.d_state = {d_state} does not divide d_xb = {d_xb}")
    dt_rank = ssm.get("dt_rank", "auto")
    return d_state, math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


def _mamba1_to_native(state: dict[str, torch.Tensor], prefix: str, d_state: int, repeats: int) -> None:
    """Rewrite one layer's MambaInLlama Mamba-1 weights in place into the native layout (module docstring)."""
    from distill.modeling_hybrid import repeat_heads

    if prefix + "in_proj.weight" not in state:
        parts = ("in_proj_z", "in_proj_x", "B_proj", "C_proj", "dt_proj_down")
        state[prefix + "in_proj.weight"] = torch.cat([state.pop(f"{prefix}{part}.weight") for part in parts])
    weight, bias = state[prefix + "conv1d.weight"], state[prefix + "conv1d.bias"]
    if weight.shape[0] != state[prefix + "D"].shape[0]:  # their conv at d_xb, before their repeat
        groups = weight.shape[0] // d_state
        weight = repeat_heads(weight.transpose(0, 2), groups, repeats).transpose(0, 2)
        state[prefix + "conv1d.weight"] = weight.contiguous()
        state[prefix + "conv1d.bias"] = repeat_heads(bias, groups, repeats)
    state[prefix + "dt_proj.bias"] = 2 * state[prefix + "dt_proj.bias"]


def mil_to_native(folder: str | Path):
    """A native `HybridForCausalLM` holding the weights of a MambaInLlama checkpoint folder."""
    from transformers import AutoConfig

    from distill.init import hybrid_config_from_teacher
    from distill.modeling_hybrid import HybridForCausalLM
    from distill.recipe import StudentConfig

    folder = Path(folder)
    for name in ("mamba_config.json", "config.json"):
        if not (folder / name).is_file():
            raise UserError(
                f"{folder} has no {name}; a MambaInLlama checkpoint folder holds mamba_config.json, the "
                f"teacher's config.json and the weights"
            )
    mil = json.loads((folder / "mamba_config.json").read_text())
    llama = AutoConfig.from_pretrained(folder)
    nh, nkv = llama.num_attention_heads, llama.num_key_value_heads
    hd = getattr(llama, "head_dim", None) or llama.hidden_size // nh
    ssm = mil.get("ssm_cfg", {})
    d_inner = mil.get("d_inner") or int(ssm.get("expand", 1) * mil["d_model"])
    d_xb = mil["d_xb"]
    if (mil["d_model"], mil["n_layer"]) != (llama.hidden_size, llama.num_hidden_layers):
        raise _refuse(
            folder,
            "mamba_config.json's d_model/n_layer do not match config.json's hidden_size/num_hidden_layers",
        )
    if (d_inner, d_xb) != (nh * hd, nkv * hd):
        raise _refuse(
            folder,
            f"d_inner={d_inner}, d_xb={d_xb}; the native mixers need nh*hd={nh * hd}, nkv*hd={nkv * hd}",
        )

    state = _load_state(folder)
    attention = sorted(mil["attn_layers"])
    kinds = {_mixer(state, i) for i in range(llama.num_hidden_layers) if i not in attention}
    if len(kinds) > 1:
        raise _refuse(folder, "it mixes Mamba-1 and Mamba-2 layers")
    mamba_layers = [i for i in range(llama.num_hidden_layers) if i not in attention]
    for i in mamba_layers:
        prefix = f"model.layers.{i}.mamba."
        if prefix + "conv1d.bias" not in state:  # conv_bias=False is a zero bias
            state[prefix + "conv1d.bias"] = torch.zeros(state[prefix + "conv1d.weight"].shape[0])
    if kinds == {"mamba1"}:
        d_state, dt_rank = _check_mamba1(folder, ssm, mil["d_model"], d_xb)
        for i in mamba_layers:
            _mamba1_to_native(state, f"model.layers.{i}.mamba.", d_state, d_inner // d_xb)
        student = StudentConfig(
            mixer="mamba1", attention_layers=attention, d_conv=ssm.get("d_conv", 4),
            mamba1_d_state=d_state, mamba1_dt_rank=dt_rank,
        )
    else:
        _check_mamba2(folder, ssm, nh, hd)
        student = StudentConfig(mixer="mamba2", attention_layers=attention, d_conv=ssm.get("d_conv", 4))
    config = hybrid_config_from_teacher(llama, student)
    config.mamba_norm_eps = MIL_GATED_NORM_EPS

    model = HybridForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise _refuse(folder, f"unexpected weights {unexpected[:4]} / missing weights {missing[:4]}")
    return model.to(llama.dtype or torch.float32).eval()


def import_mil(mil_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a MambaInLlama folder into a native checkpoint folder (written atomically)."""
    folder, out = Path(mil_dir), Path(out_dir)
    check_out_dir(out)
    model = mil_to_native(folder)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # safetensors, config with auto_map, and the modeling code
        has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
        copy_tokenizer_and_generation_config(model, folder if has_tokenizer else None, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    """`distill import-mil DIR --out OUT`."""
    parser = argparse.ArgumentParser(
        prog="distill import-mil", description="Convert a MambaInLlama checkpoint to our native format."
    )
    parser.add_argument("mil_dir", help="folder with mamba_config.json, config.json and the weights")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = import_mil(args.mil_dir, args.out)
    print(f"wrote native checkpoint to {out}")
    return 0
