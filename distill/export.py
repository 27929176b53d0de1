"""Export a trained hybrid so that any tool that loads Hugging Face models loads it.

Two formats, both written atomically (a temp folder next to `out`, then one rename):

- `native`: our `HybridForCausalLM` as a self-contained HF folder: sharded safetensors, a config with
  `auto_map` and the modeling code copied in (loads with `trust_remote_code=True`, no `distill` needed),
  the teacher's tokenizer + chat template + `generation_config.json`, and a model card with the recipe,
  the token budgets and the eval table.
- `bamba`: a lossless conversion of a Mamba-2 hybrid into transformers' stock `BambaForCausalLM` (no
  remote code; lm-eval `--model hf` and vLLM know it). Bamba's mixer is ours with every kv-width tensor
  expanded to full width:

      ours   in_proj rows  [z (nh*hd) | x (nkv*hd) | B (nkv*n) | C (nh*n) | dt (nh)]
      Bamba  in_proj rows  [z | R(x) | R(B) | C | dt]        with mamba_n_groups = mamba_n_heads = nh

  (n = d_state) where R repeats each kv group's rows nh/nkv times in place (`repeat_interleave`, the way GQA repeats
  keys: head h reads group h // (nh/nkv)); tiling would pair heads with the wrong group. The depthwise conv
  over [x | B | C] is expanded the same way (weights and bias), which is exact because the conv is per
  channel. Bamba derives intermediate = mamba_expand * hidden_size, so `mamba_expand = 1` needs
  nh * hd == hidden_size; its gated norm uses `rms_norm_eps` with group = intermediate / n_groups = hd
  (per-group only since transformers 5.23), and its rotary factor defaults to 0.5 unless the rope
  parameters say 1.0. Every one of these is checked, and the export finishes by comparing the two
  models' logits on a short random sequence. Teacher families: Bamba's attention is Llama's, so a Llama or
  Mistral (without sliding window) teacher's student converts; what Bamba computes differently in the layers
  of this student is refused in one line naming it: Qwen3's q/k norms, a per-head B/C norm in the mixers,
  sliding-window or NoPE attention layers, and in_proj biases (Qwen2's q/k/v biases: Bamba's mixer adds
  its in_proj bias at padded positions too, so a left-padded row would no longer equal the row alone).

`--push-to-hub REPO_ID` uploads the finished folder with `huggingface_hub`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from distill.checkpoints import (
    check_out_dir,
    copy_tokenizer_and_generation_config,
    find_upwards,
    load_hybrid,
    tokenizer_source,
)
from distill.errors import UserError
from distill.files import atomic_dir

logger = logging.getLogger(__name__)

FORMATS = ("native", "bamba", "gguf")
MIN_TRANSFORMERS_FOR_BAMBA = "5.23"

# Our key -> Bamba key, for the parts that only change name (attention keeps Llama's names in both).
_BAMBA_RENAMES = (
    (".post_attention_layernorm.", ".pre_ff_layernorm."),
    (".mlp.", ".feed_forward."),
    ("model.norm.", "model.final_layernorm."),
)


# ----------------------------------------------------------------------------- stock Bamba


def _check_transformers_for_bamba() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS_FOR_BAMBA):
        raise UserError(
            f"--format bamba needs transformers >= {MIN_TRANSFORMERS_FOR_BAMBA} (older Bamba normalises the "
            f"gated norm over all heads at once and loads the export silently wrong); found "
            f"{transformers.__version__}, run: pip install -U 'transformers>={MIN_TRANSFORMERS_FOR_BAMBA}'"
        )


def bamba_config(cfg):
    """The `BambaConfig` equivalent to a Mamba-2 `HybridConfig`; refuses what Bamba cannot express."""
    from transformers import BambaConfig

    _check_transformers_for_bamba()
    kinds = set(cfg.mixer_types)
    if "mamba1" in kinds:
        raise UserError(
            "this hybrid has Mamba-1 layers, which no stock transformers architecture implements; "
            "use --format native (loads with trust_remote_code=True)"
        )
    _refuse_what_bamba_lacks(cfg)
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if nh * hd != cfg.hidden_size:
        raise UserError(
            f"Bamba derives the mixer width from hidden_size (mamba_expand=1), but this model has "
            f"num_attention_heads*head_dim = {nh}*{hd} != hidden_size = {cfg.hidden_size}; use --format native"
        )
    if cfg.mamba_norm_eps != cfg.rms_norm_eps:
        raise UserError(
            f"the student's gated-norm eps ({cfg.mamba_norm_eps}) differs from rms_norm_eps "
            f"({cfg.rms_norm_eps}), and Bamba uses rms_norm_eps for both; the export would not be lossless. "
            f"Use --format native, or train with the gated-norm eps equal to rms_norm_eps"
        )
    rope = dict(cfg.rope_parameters)
    rope["partial_rotary_factor"] = 1.0  # Bamba otherwise rotates only half of each head
    return BambaConfig(
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        hidden_act=cfg.hidden_act,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        rope_parameters=rope,
        attn_layer_indices=[i for i, kind in enumerate(cfg.mixer_types) if kind == "attention"],
        mamba_n_heads=nh,
        mamba_n_groups=nh,
        mamba_d_head=hd,
        mamba_d_state=cfg.mamba2_d_state,
        mamba_expand=1,
        mamba_d_conv=cfg.d_conv,
        mamba_chunk_size=cfg.chunk_size,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        time_step_limit=(0.0, float("inf")),
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        dtype=cfg.dtype,
    )


def _refuse_what_bamba_lacks(cfg) -> None:
    """One-line refusal naming a teacher-family feature of this student that BambaForCausalLM cannot compute."""
    attention = [i for i, kind in enumerate(cfg.mixer_types) if kind == "attention"]
    sliding = [i for i in attention if cfg.attention_types[i] == "sliding_attention"]
    nope = [i for i in attention if cfg.no_rope_layers is not None and not cfg.no_rope_layers[i]]
    lacking = []
    if cfg.teacher_model_type == "qwen3" and attention:
        lacking.append(f"per-head q/k norms (Qwen3's q_norm/k_norm) in attention layers {attention}")
    if cfg.mamba_proj_bias and set(cfg.mixer_types) != {"attention"}:
        lacking.append(
            "biases on the mixers' in_proj (from the teacher's q/k/v biases), which Bamba also adds at padded "
            "positions, so padded batches would differ"
        )
    if cfg.mamba_bc_norm:
        lacking.append("a per-head RMSNorm on the mixers' B and C (mamba_bc_norm, from Qwen3's q/k norms)")
    if sliding:
        lacking.append(f"sliding-window attention ({cfg.sliding_window} tokens) in layers {sliding}")
    if nope:
        lacking.append(f"attention without RoPE (SmolLM3's NoPE) in layers {nope}")
    if lacking:
        raise UserError(
            f"Bamba cannot express {'; '.join(lacking)}: a stock Bamba would load but compute something else; "
            f"use --format native (loads with trust_remote_code=True)"
        )


def _repeat_kv_rows(rows: torch.Tensor, num_kv: int, repeats: int) -> torch.Tensor:
    """(num_kv * w, ...) -> (num_kv * repeats * w, ...): each kv group's w rows repeated in place."""
    grouped = rows.reshape(num_kv, -1, *rows.shape[1:])
    return grouped.repeat_interleave(repeats, dim=0).reshape(-1, *rows.shape[1:])


def _expand_xb(tensor: torch.Tensor, z_width: int, x_width: int, b_width: int, num_kv: int,
               repeats: int) -> torch.Tensor:
    """Expand the x and B blocks that follow `z_width` leading rows from kv width to full width."""
    rest = tensor.shape[0] - z_width - x_width - b_width
    z, x, b, rest = tensor.split([z_width, x_width, b_width, rest])
    return torch.cat([z, _repeat_kv_rows(x, num_kv, repeats), _repeat_kv_rows(b, num_kv, repeats), rest])


def bamba_state_dict(cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (docs/design.md names) -> `BambaForCausalLM`'s."""
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    converted = {}
    for name, tensor in state.items():
        for old, new in _BAMBA_RENAMES:
            name = name.replace(old, new)
        converted[name] = tensor
    for i, kind in enumerate(cfg.mixer_types):
        if kind != "mamba2":
            continue
        prefix = f"model.layers.{i}.mamba."
        widths = {"num_kv": nkv, "repeats": nh // nkv, "x_width": nkv * hd, "b_width": nkv * cfg.mamba2_d_state}
        converted[prefix + "in_proj.weight"] = _expand_xb(state[prefix + "in_proj.weight"], nh * hd, **widths)
        for key in ("conv1d.weight", "conv1d.bias"):
            converted[prefix + key] = _expand_xb(state[prefix + key], 0, **widths)
    return converted


def write_bamba(model, folder: Path, max_shard_size: str) -> None:
    """Write the `BambaForCausalLM` equivalent of our Mamba-2 `HybridForCausalLM` into `folder`."""
    from huggingface_hub import save_torch_state_dict

    config = bamba_config(model.config)
    state = bamba_state_dict(model.config, model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config.architectures = ["BambaForCausalLM"]
    config.save_pretrained(folder)
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size)


@torch.no_grad()
def _check_same_logits(native, converted, tokens: int = 24) -> None:
    """Compare both models on one random sequence; a silent mismatch must never reach a user."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, native.config.vocab_size, (1, tokens), generator=generator)
    expected = native(ids).logits.float()
    got = converted(ids).logits.float()
    tolerance = 1e-4 if native.dtype == torch.float32 else 5e-2
    scale = expected.abs().max().clamp(min=1.0)
    diff = ((expected - got).abs().max() / scale).item()
    if diff > tolerance:
        raise RuntimeError(
            f"Bamba export does not reproduce the native logits (relative max diff {diff:.2e})"
        )


# ----------------------------------------------------------------------------- model card


def model_card(model, fmt: str, recipe_path: Path | None, report_path: Path | None) -> str:
    """README.md: how to load it, what it is, the recipe and token budgets, and the eval table."""
    cfg = model.config
    kinds = cfg.mixer_types
    attention = [i for i, kind in enumerate(kinds) if kind == "attention"]
    mixers = sorted(set(kinds) - {"attention"})
    load = (
        "AutoModelForCausalLM.from_pretrained(path)  # stock BambaForCausalLM, transformers >= "
        + MIN_TRANSFORMERS_FOR_BAMBA
        if fmt == "bamba"
        else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mamba-distill, hybrid, " + ", ".join(mixers or ["attention"]) + "]",
        "---",
        "",
        "# Attention/Mamba hybrid distilled with mamba-distill",
        "",
        (
            f"{len(kinds)} layers: {len(attention)} keep attention ({attention}), the others are "
            f"{' / '.join(mixers) or 'none'} mixers initialised from the teacher's attention weights."
        ),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        f"model = {load}",
        "```",
    ]
    if recipe_path is not None:
        from distill.recipe import load_recipe

        recipe = load_recipe(recipe_path)
        lines += [
            "",
            "## Training",
            "",
            f"Teacher: `{recipe.teacher.source}`.",
            "",
            "| stage | name | token budget | lr |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {i} | {stage.name} | {stage.max_tokens:,} | {stage.lr:g} |"
            for i, stage in enumerate(recipe.stages)
        ]
        lines += ["", "### Recipe", "", "```yaml", recipe.dump().rstrip(), "```"]
    if report_path is not None:
        from distill.eval.report import markdown_table

        lines += ["", "## Evaluation", "", markdown_table(json.loads(report_path.read_text()))]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- export


def export(
    checkpoint_dir: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    push_to_hub: str | None = None,
    max_shard_size: str = "2GB",
    report: str | Path | None = None,
    outtype: str = "q8_0",
) -> Path:
    """Write `checkpoint_dir` as `fmt` into `out_dir` (`outtype`: gguf only); optionally push it. Returns out_dir."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        from distill.export_gguf import export_gguf

        out = export_gguf(checkpoint_dir, out_dir, outtype).parent
        if push_to_hub:
            logger.info("pushed %s to %s", out, push(out, push_to_hub))
        return out
    folder, out = Path(checkpoint_dir), Path(out_dir)
    if out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents:
        raise UserError(f"--out {out} would replace the checkpoint being exported; choose another folder")
    check_out_dir(out)
    model = load_hybrid(folder)
    if fmt == "bamba":
        bamba_config(model.config)  # refuse before writing anything
    report_path = Path(report) if report is not None else find_upwards(folder, "eval/report.json", levels=1)
    if report_path is not None and not report_path.is_file():
        raise UserError(
            f"--report {report_path} does not exist; pass the report.json that `distill eval` wrote"
        )
    card = model_card(model, fmt, find_upwards(folder, "recipe.yaml"), report_path)
    tokenizer_folder = tokenizer_source(folder)
    if tokenizer_folder is None:
        raise UserError(
            f"found no tokenizer in {folder}, its run folder or the recipe's teacher; save the tokenizer "
            f"into the checkpoint folder (tokenizer.save_pretrained) and export again"
        )
    with atomic_dir(out) as tmp:  # `out` is never half-written
        if fmt == "native":
            model.save_pretrained(tmp, max_shard_size=max_shard_size)  # also copies the modeling code
        else:
            from transformers import BambaForCausalLM

            write_bamba(model, tmp, max_shard_size)
            _check_same_logits(model, BambaForCausalLM.from_pretrained(tmp, dtype=model.dtype).eval())
        copy_tokenizer_and_generation_config(model, tokenizer_folder, tmp)
        (tmp / "README.md").write_text(card)
    if push_to_hub:
        logger.info("pushed %s to %s", out, push(out, push_to_hub))
    return out


def push(folder: Path, repo_id: str) -> str:
    """Upload an export folder with huggingface_hub; network and auth failures become one-line errors."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError  # the HTTP client's base error, which hub errors extend

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message="Upload from mamba-distill"
        )
    except (HTTPError, OSError, ValueError) as err:  # network, auth, offline mode, bad repo id
        reason = (str(err).strip().splitlines() or [""])[0]
        raise UserError(
            f"--push-to-hub {repo_id}: could not upload to {api.endpoint} ({type(err).__name__}: {reason}); "
            f"the export is complete in {folder}; check the network and `hf auth login`, then run "
            f"`hf upload {repo_id} {folder}`"
        ) from None
    return commit.commit_url


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """`distill export CKPT --format native|bamba|gguf --out DIR [--outtype T] [--push-to-hub REPO_ID]`."""
    parser = argparse.ArgumentParser(prog="distill export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", help="a checkpoint folder written by `distill run` (e.g. outputs/run/final)"
    )
    parser.add_argument("--format", choices=FORMATS, default="native", dest="fmt")
    parser.add_argument(
        "--out", required=True, help="folder to write (replaced atomically if it holds a model)"
    )
    parser.add_argument(
        "--outtype", default="q8_0", help="gguf only: f32, f16, bf16 or q8_0 (the weights' type; default q8_0)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this hub repository")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument(
        "--report", help="eval report.json for the model card (default: <run>/eval/report.json)"
    )
    args = parser.parse_args(argv)
    out = export(
        args.checkpoint,
        args.fmt,
        args.out,
        push_to_hub=args.push_to_hub,
        max_shard_size=args.max_shard_size,
        report=args.report,
        outtype=args.outtype,
    )
    print(f"wrote {args.fmt} export to {out}")
    return 0
