"""Reading the folders a run writes: a checkpoint's weights, its tokenizer, and where its run's files are.

Export, the GGUF export, the MambaInLlama import and the chat command all open checkpoints the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def check_safetensors(folder: Path) -> None:
    """Open every safetensors header so a truncated or damaged file fails with its name, not a traceback."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"{folder} has no *.safetensors weights; "
            f"pass the folder the trainer wrote, e.g. outputs/run/final"
        )
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise UserError(
                f"{path} is damaged or truncated ({err}); copy it again or export an earlier checkpoint"
            ) from None


def load_hybrid(checkpoint_dir: str | Path):
    """Our `HybridForCausalLM` from a checkpoint folder, in the dtype it was saved in, eval mode."""
    from distill.modeling_hybrid import HybridForCausalLM

    folder = Path(checkpoint_dir)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise UserError(
            f"checkpoint {str(folder)!r} {what}; pass the folder the trainer wrote, e.g. outputs/run/final"
        )
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "distill_hybrid":
        raise UserError(
            f"{folder} holds a {model_type!r} model, not a mamba-distill hybrid; export works on the "
            f"folders `distill run` writes (e.g. outputs/run/final)"
        )
    check_safetensors(folder)
    return HybridForCausalLM.from_pretrained(folder, dtype="auto").eval()


def find_upwards(folder: Path, relative: str, levels: int = 2) -> Path | None:
    """`folder/relative`, else the same under its parents (a checkpoint sits inside the run's output_dir)."""
    for parent in [folder, *folder.parents][: levels + 1]:
        if (parent / relative).is_file():
            return parent / relative
    return None


def tokenizer_source(folder: Path) -> Path | None:
    """Where the tokenizer lives: the checkpoint, the run folder, or the teacher named by the run's recipe."""
    for parent in [folder, *folder.parents][:3]:
        if any((parent / name).is_file() for name in TOKENIZER_FILES):
            return parent
    recipe = find_upwards(folder, "recipe.yaml")
    if recipe is None:
        return None
    from distill.recipe import load_recipe
    from distill.teacher import resolve_source

    source, _ = resolve_source(load_recipe(recipe).teacher)
    return Path(source) if Path(source).is_dir() else None


def copy_tokenizer_and_generation_config(model, source: Path | None, out: Path) -> None:
    """The tokenizer (with its chat template) and generation config from `source`, next to the weights."""
    from transformers import AutoTokenizer, GenerationConfig

    if source is not None:
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    if source is not None and (source / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(source)
    else:
        generation = GenerationConfig.from_model_config(model.config)
    generation.save_pretrained(out)


def check_out_dir(out: Path) -> None:
    """Refuse to replace a folder that is not a model folder (a typo must not delete someone's files)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise UserError(f"--out {out} exists and is not a model folder; choose a new or empty folder")
