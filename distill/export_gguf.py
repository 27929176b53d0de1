"""GGUF export: one file that llama.cpp (and ollama, LM Studio, node-llama-cpp) runs on a CPU.

A Mamba-2 hybrid is written as llama.cpp's `granitehybrid` architecture (what its converter makes of
`BambaForCausalLM`); a hybrid without Mamba layers (the teacher itself) as `llama`. `granitehybrid` marks each
layer's kind by its `attention.head_count_kv`, 0 for an SSM layer, and its Mamba-2 layer is Bamba's:

    ssm_in rows   [z (d_inner) | x (d_inner) | B (ng*ds) | C (ng*ds) | dt (heads)]
    ssm_conv1d    (d_inner + 2*ng*ds, d_conv) over [x | B | C], with bias
    ssm_a = -exp(A_log), ssm_d, ssm_dt.bias per head; ssm_norm (ng, d_inner/ng): a gated RMSNorm per group

so our layout maps as the Bamba export does (x and B repeated per head like GQA's K/V, one group per head,
ds = our d_state n). What llama.cpp wants on top:

- Its loader only accepts `d_inner = 2 * hidden_size` (`GGML_ASSERT(2 * n_embd == d_inner)` in
  granite-hybrid.cpp, "only an expansion factor of 2"), while ours is nh*hd (= hidden for a Llama teacher).
  The exporter writes each of our heads r = 2*hidden/(nh*hd) times in a row: the copies share the head's group
  (llama.cpp's head h reads group h // r, so B and C stay one per head), compute the same output, and the
  gated RMSNorm over the group (r copies) sees the head's own mean square; out_proj reads the first copy and
  gives the others zero columns. The logits are unchanged; the copies cost z/x rows of in_proj, out_proj
  columns and scan work (r-1 of each r).
- llama.cpp cannot allocate an attention cache with no attention layer (`GGML_ASSERT(buffer)` when the
  context is created), so a student without attention gets one extra last layer that adds exactly 0: a
  one-head attention and an MLP whose output projections (attn_output, ffn_down) are 0. Its cost is one
  head's attention and one MLP.
- llama.cpp's RoPE pairs adjacent channels (`LLAMA_ROPE_TYPE_NORM`) where transformers' rotates halves, so the
  rows of q and k are permuted per head (the permutation every Llama GGUF carries).

What llama.cpp cannot compute is refused in one `error:` line naming the feature: Mamba-1 mixers (llama.cpp's
only Mamba-1 hybrid, `jamba`, computes dt from the conv output with RMSNorms on dt, B and C; ours takes a
low-rank dt from the layer input), q/k norms, B/C norms, in_proj biases, sliding-window and NoPE attention,
a gated-norm eps that differs from rms_norm_eps, and RoPE scalings other than none and `llama3`.

The tokenizer and chat template come from the teacher: for the built-in teacher, copied from its own GGUF's
`tokenizer.*` fields; for an HF teacher, built from its tokenizer files with gguf's vocab helpers.
Output types: f32, f16, bf16 and q8_0 (2-D weight matrices only; norms, conv, A, D and biases stay f32, as in
llama.cpp's converter).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from distill.errors import UserError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
FILE_NAME = "model.gguf"

# HF tokenizer families llama.cpp knows how to pre-tokenize, by (teacher model_type, vocab size).
_PRE_TOKENIZERS = {
    ("llama", 49152): "smollm",
    ("llama", 128256): "llama-bpe",
    ("qwen2", None): "qwen2",
    ("qwen3", None): "qwen2",
    ("smollm3", None): "llama-bpe",
}

# Our key (after `model.layers.N.`) -> GGUF name (after `blk.N.`), for tensors that only change name.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
}


# ----------------------------------------------------------------------------- what llama.cpp can run


def refuse_what_llama_cpp_lacks(cfg) -> None:
    """One-line refusal naming a feature of this student that no llama.cpp architecture computes."""
    kinds = cfg.mixer_types
    attention = [i for i, kind in enumerate(kinds) if kind == "attention"]
    lacking = []
    if "mamba1" in kinds:
        lacking.append(
            "Mamba-1 mixers (llama.cpp's Mamba-1 hybrid, jamba, computes dt from the conv output; ours takes "
            "a low-rank dt from the layer input); train a Mamba-2 student (student.mixer: mamba2)"
        )
    if cfg.teacher_model_type == "qwen3" and attention:
        lacking.append(f"per-head q/k norms (Qwen3's q_norm/k_norm) in attention layers {attention}")
    if cfg.mamba_proj_bias and set(kinds) != {"attention"}:
        lacking.append("biases on the mixers' in_proj/out_proj (from the teacher's q/k/v biases)")
    if cfg.mamba_bc_norm and set(kinds) != {"attention"}:
        lacking.append("a per-head RMSNorm on the mixers' B and C (mamba_bc_norm, from Qwen3's q/k norms)")
    sliding = [i for i in attention if cfg.attention_types[i] == "sliding_attention"]
    if sliding:
        lacking.append(f"sliding-window attention ({cfg.sliding_window} tokens) in layers {sliding}")
    nope = [i for i in attention if cfg.no_rope_layers is not None and not cfg.no_rope_layers[i]]
    if nope:
        lacking.append(f"attention without RoPE (SmolLM3's NoPE) in layers {nope}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        lacking.append("biases on the attention or MLP projections")
    if "mamba2" in kinds and cfg.mamba_norm_eps != cfg.rms_norm_eps:
        lacking.append(
            f"a gated-norm eps ({cfg.mamba_norm_eps}) other than rms_norm_eps ({cfg.rms_norm_eps}), "
            f"which llama.cpp uses for both"
        )
    rope_type = (cfg.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        lacking.append(f"RoPE scaling {rope_type!r} (supported: none, llama3)")
    width = cfg.num_attention_heads * cfg.head_dim
    if "mamba2" in kinds and (2 * cfg.hidden_size) % width:
        lacking.append(
            f"a mixer width nh*hd = {width} that does not divide 2*hidden_size ({2 * cfg.hidden_size}), "
            f"the only width llama.cpp's granitehybrid loads (each head is written 2*hidden/width times)"
        )
    if lacking:
        raise UserError(
            f"llama.cpp cannot run {'; '.join(lacking)}; "
            f"use --format native (loads with trust_remote_code=True)"
        )


def architecture(cfg) -> str:
    """`granitehybrid` for a model with Mamba-2 layers, `llama` for an all-attention one (the teacher)."""
    return "granitehybrid" if "mamba2" in cfg.mixer_types else "llama"


def needs_null_layer(cfg) -> bool:
    """A granitehybrid without attention gets an extra zero-output attention layer (llama.cpp needs one)."""
    return architecture(cfg) == "granitehybrid" and "attention" not in cfg.mixer_types


def _null_layer(cfg, index: int) -> dict[str, torch.Tensor]:
    """Layer `index`: one attention head and an MLP, both writing 0 to the residual stream."""
    hidden, hd, ff = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    blk = f"blk.{index}."
    return {
        blk + "attn_norm.weight": torch.ones(hidden),
        blk + "attn_q.weight": torch.zeros(hd, hidden),
        blk + "attn_k.weight": torch.zeros(hd, hidden),
        blk + "attn_v.weight": torch.zeros(hd, hidden),
        blk + "attn_output.weight": torch.zeros(hidden, hd),
        blk + "ffn_norm.weight": torch.ones(hidden),
        blk + "ffn_gate.weight": torch.zeros(ff, hidden),
        blk + "ffn_up.weight": torch.zeros(ff, hidden),
        blk + "ffn_down.weight": torch.zeros(hidden, ff),
    }


def ssm_heads(cfg) -> int:
    """Heads of the exported mixer: each of ours written `ssm_copies` times, to llama.cpp's width 2*hidden."""
    return 2 * cfg.hidden_size // cfg.head_dim


def ssm_copies(cfg) -> int:
    return ssm_heads(cfg) // cfg.num_attention_heads


# ----------------------------------------------------------------------------- tensors


def _rope_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' rotate-half order to llama.cpp's adjacent pairs, per head."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def _repeat_groups(rows: torch.Tensor, groups: int, repeats: int) -> torch.Tensor:
    """(groups * g, ...) -> (groups * repeats * g, ...): each group repeated in place (GQA's repeat)."""
    return (
        rows.reshape(groups, -1, *rows.shape[1:]).repeat_interleave(repeats, 0).reshape(-1, *rows.shape[1:])
    )


def _mamba2_tensors(cfg, prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One Mamba-2 layer in llama.cpp's layout (GGUF suffix -> tensor): x and B one per head, heads copied."""
    nh, nkv, hd, n = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.mamba2_d_state
    d_inner, d_xb, copies = nh * hd, nkv * hd, ssm_copies(cfg)

    def per_head(block: torch.Tensor) -> torch.Tensor:  # kv-wide x or B -> one block per head (GQA's repeat)
        return _repeat_groups(block, nkv, nh // nkv)

    def copied(block: torch.Tensor) -> torch.Tensor:  # one block per head -> `copies` blocks per head
        return _repeat_groups(block, nh, copies)

    def xbc(tensor: torch.Tensor) -> torch.Tensor:
        x, b, c = tensor.split([d_xb, nkv * n, nh * n])
        return torch.cat([copied(per_head(x)), per_head(b), c])

    z, xbc_rows, dt = state[prefix + "in_proj.weight"].split([d_inner, d_xb + nkv * n + nh * n, nh])
    out = state[prefix + "out_proj.weight"].reshape(cfg.hidden_size, nh, 1, hd)
    first_copy_only = torch.cat([out, out.new_zeros(cfg.hidden_size, nh, copies - 1, hd)], dim=2)
    return {
        "ssm_in.weight": torch.cat([copied(z), xbc(xbc_rows), copied(dt)]),
        "ssm_conv1d.weight": xbc(state[prefix + "conv1d.weight"].squeeze(1)),
        "ssm_conv1d.bias": xbc(state[prefix + "conv1d.bias"]),
        "ssm_dt.bias": copied(state[prefix + "dt_bias"]),
        "ssm_a": copied(-torch.exp(state[prefix + "A_log"].float())).unsqueeze(1),
        "ssm_d": copied(state[prefix + "D"]).unsqueeze(1),
        "ssm_norm.weight": copied(state[prefix + "norm.weight"]).reshape(nh, copies * hd),
        "ssm_out.weight": first_copy_only.reshape(cfg.hidden_size, copies * d_inner),
    }


def gguf_tensors(cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> llama.cpp's tensors (GGUF names; shapes are PyTorch's (out, in), GGUF's reversed)."""
    state = {name: tensor.detach().float() for name, tensor in state.items()}
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i, kind in enumerate(cfg.mixer_types):
        prefix = f"model.layers.{i}."
        for ours, theirs in _LAYER_NAMES.items():
            if prefix + ours in state:
                tensors[f"blk.{i}.{theirs}"] = state[prefix + ours]
        if kind == "attention":
            q, k = state[prefix + "self_attn.q_proj.weight"], state[prefix + "self_attn.k_proj.weight"]
            tensors[f"blk.{i}.attn_q.weight"] = _rope_pairs(q, cfg.num_attention_heads)
            tensors[f"blk.{i}.attn_k.weight"] = _rope_pairs(k, cfg.num_key_value_heads)
        else:
            for suffix, tensor in _mamba2_tensors(cfg, prefix + "mamba.", state).items():
                tensors[f"blk.{i}.{suffix}"] = tensor
    if needs_null_layer(cfg):
        tensors |= _null_layer(cfg, cfg.num_hidden_layers)
    if (cfg.rope_parameters or {}).get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(cfg)
    return tensors


def llama3_rope_factors(cfg) -> torch.Tensor:
    """Llama 3's per-frequency RoPE divisors (llama.cpp multiplies each wavelength by its `rope_freqs`)."""
    rope = cfg.rope_parameters
    base, dim = rope["rope_theta"], cfg.head_dim
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors)


def _quantize(name: str, tensor: torch.Tensor, outtype: str, f16_tensors: tuple[str, ...] = ()):
    """(data, raw_dtype) for the writer: 2-D matrices in `outtype` (those whose name ends with one of
    `f16_tensors` in f16 when `outtype` is q8_0), everything else f32."""
    import gguf

    array = tensor.numpy().astype(np.float32)
    matrix = array.ndim == 2 and not name.endswith(("ssm_conv1d.weight", "ssm_norm.weight", "ssm_a", "ssm_d"))
    if not matrix or outtype == "f32":
        return array, None
    if outtype == "f16" or (outtype == "q8_0" and name.endswith(f16_tensors)):
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    if array.shape[-1] % block:  # Q8_0 needs whole blocks of 32 per row; llama.cpp's converter falls back too
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, kind), kind


# ----------------------------------------------------------------------------- metadata


def _file_type(outtype: str) -> int:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]


def _add_hyperparameters(writer, cfg, outtype: str) -> None:
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    null = needs_null_layer(cfg)
    writer.add_block_count(cfg.num_hidden_layers + null)
    writer.add_feed_forward_length(cfg.intermediate_size)
    if architecture(cfg) == "granitehybrid":
        kv = [cfg.num_key_value_heads if kind == "attention" else 0 for kind in cfg.mixer_types]
        writer.add_head_count([cfg.num_attention_heads] * cfg.num_hidden_layers + [1] * null)
        writer.add_head_count_kv(kv + [1] * null)
        heads = ssm_heads(cfg)
        writer.add_ssm_conv_kernel(cfg.d_conv)
        writer.add_ssm_inner_size(heads * cfg.head_dim)
        writer.add_ssm_state_size(cfg.mamba2_d_state)
        writer.add_ssm_time_step_rank(heads)
        writer.add_ssm_group_count(cfg.num_attention_heads)
    else:
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(_file_type(outtype))


def tokenizer_from_gguf(path: str | Path) -> list[tuple]:
    """Every `tokenizer.*` field of a GGUF file as (key, value, type, sub_type), for `add_key_value`."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if len(field.types) > 1 else None
            fields.append((key, field.contents(), field.types[0], sub_type))
    return fields


def tokenizer_from_hf(folder: str | Path, cfg, pre: str | None = None) -> list[tuple]:
    """The `tokenizer.*` fields for an HF (BPE) tokenizer folder, built with gguf's vocab helpers.

    `pre` names llama.cpp's pre-tokenizer (its regex split before BPE); by default it is looked up by family.
    """
    import gguf
    from transformers import AutoTokenizer

    folder = Path(folder)
    pre = (
        pre
        or _PRE_TOKENIZERS.get((cfg.teacher_model_type, cfg.vocab_size))
        or _PRE_TOKENIZERS.get((cfg.teacher_model_type, None))
    )
    if pre is None or not (folder / "tokenizer.json").is_file():
        raise UserError(
            f"the GGUF export knows how llama.cpp pre-tokenizes SmolLM2, Llama 3, Qwen2/3 and SmolLM3 BPE "
            f"tokenizers, not this {cfg.teacher_model_type} one (vocab {cfg.vocab_size}) in {folder}; "
            f"use --format native"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    special = set(tokenizer.all_special_tokens)
    tokens = [""] * max(len(vocab), cfg.vocab_size)
    types = [gguf.TokenType.UNUSED] * len(tokens)
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = (
            gguf.TokenType.CONTROL
            if text in special
            else gguf.TokenType.USER_DEFINED
            if text in added
            else gguf.TokenType.NORMAL
        )
    for index, text in enumerate(tokens):
        if not text:
            tokens[index] = f"[PAD{index}]"
    fields = [
        ("tokenizer.ggml.model", "gpt2", gguf.GGUFValueType.STRING, None),
        ("tokenizer.ggml.pre", pre, gguf.GGUFValueType.STRING, None),
        ("tokenizer.ggml.tokens", tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
        (
            "tokenizer.ggml.token_type",
            [int(t) for t in types],
            gguf.GGUFValueType.ARRAY,
            gguf.GGUFValueType.INT32,
        ),
    ]

    class Collect:  # SpecialVocab writes merges, special ids and the chat template through add_* calls
        def __getattr__(self, name):
            return lambda *args: calls.append((name, args))

    calls: list[tuple] = []
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(Collect(), quiet=True)
    for name, args in calls:
        key, value = _SPECIAL_VOCAB_KEYS[name], args[0]
        kind = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32, str: gguf.GGUFValueType.STRING}
        if isinstance(value, (list, tuple)):
            fields.append((key, list(value), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING))
        else:
            fields.append((key, value, kind[type(value)], None))
    return fields


_SPECIAL_VOCAB_KEYS = {
    "add_token_merges": "tokenizer.ggml.merges",
    "add_chat_template": "tokenizer.chat_template",
    "add_add_bos_token": "tokenizer.ggml.add_bos_token",
    "add_add_eos_token": "tokenizer.ggml.add_eos_token",
    "add_add_sep_token": "tokenizer.ggml.add_sep_token",
    "add_bos_token_id": "tokenizer.ggml.bos_token_id",
    "add_eos_token_id": "tokenizer.ggml.eos_token_id",
    "add_unk_token_id": "tokenizer.ggml.unknown_token_id",
    "add_sep_token_id": "tokenizer.ggml.seperator_token_id",
    "add_pad_token_id": "tokenizer.ggml.padding_token_id",
    "add_eot_token_id": "tokenizer.ggml.eot_token_id",
    "add_eom_token_id": "tokenizer.ggml.eom_token_id",
}


# ----------------------------------------------------------------------------- writing


def write_gguf(
    model,
    path: str | Path,
    outtype: str,
    tokenizer_fields: list[tuple],
    name: str = "",
    f16_tensors: tuple[str, ...] = (),
) -> Path:
    """Write `model` (our HybridForCausalLM) to the GGUF file `path` in `outtype`. Returns the path.

    `f16_tensors`: name suffixes of matrices a q8_0 file keeps in f16 (scripts/gguf_agreement.py measures
    which matter)."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r} is not supported; use one of {', '.join(OUTTYPES)}")
    cfg = model.config
    refuse_what_llama_cpp_lacks(cfg)
    writer = gguf.GGUFWriter(str(path), architecture(cfg))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or "mamba-distill hybrid")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, cfg, outtype)
    for key, value, vtype, sub_type in tokenizer_fields:
        writer.add_key_value(key, value, vtype, sub_type)
    for tensor_name, tensor in gguf_tensors(cfg, model.state_dict()).items():
        data, raw_dtype = _quantize(tensor_name, tensor, outtype, f16_tensors)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _tokenizer_fields(model, folder: Path) -> list[tuple]:
    """The teacher's tokenizer: the built-in teacher's own GGUF fields, else its HF tokenizer files."""
    from distill.assets import asset_path
    from distill.checkpoints import find_upwards, tokenizer_source
    from distill.teacher import BUILTIN_TEACHER

    recipe = find_upwards(folder, "recipe.yaml")
    if recipe is not None:
        from distill.recipe import load_recipe

        if load_recipe(recipe).teacher.source == BUILTIN_TEACHER:
            return tokenizer_from_gguf(asset_path("smollm2"))
    source = tokenizer_source(folder)
    if source is None:
        raise UserError(
            f"found no tokenizer in {folder}, its run folder or the recipe's teacher; save the tokenizer "
            f"into the checkpoint folder (tokenizer.save_pretrained) and export again"
        )
    return tokenizer_from_hf(source, model.config)


def export_gguf(checkpoint_dir: str | Path, out_dir: str | Path, outtype: str = "q8_0") -> Path:
    """Write `checkpoint_dir` as `out_dir/model-<outtype>.gguf` (folder replaced atomically); returns it."""
    from distill.checkpoints import load_hybrid
    from distill.files import atomic_dir

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r} is not supported; use one of {', '.join(OUTTYPES)}")
    folder, out = Path(checkpoint_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(p.suffix != ".gguf" for p in out.iterdir())):
        raise UserError(f"--out {out} exists and is not a GGUF export folder; choose a new or empty folder")
    model = load_hybrid(folder)
    refuse_what_llama_cpp_lacks(model.config)
    fields = _tokenizer_fields(model, folder)
    file_name = f"model-{outtype}.gguf"
    with atomic_dir(out) as tmp:  # `out` is never half-written
        write_gguf(model, tmp / file_name, outtype, fields, name=folder.name)
    return out / file_name
