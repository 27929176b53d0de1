"""The teacher families the student reproduces, and the one check of a teacher against them.

Light on purpose (no torch, no transformers): `distill validate` and the teacher's config check use it before
anything heavy loads. `configuration_hybrid.py` imports the list relatively, so this file travels with it into
every checkpoint's remote code.
"""

# transformers' model_type of each family
TEACHER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


def check_teacher_family(model_type: str | None) -> None:
    """Refuse, in one line, a teacher whose family the student cannot reproduce."""
    if model_type not in TEACHER_MODEL_TYPES:
        from distill.recipe import RecipeError

        raise RecipeError(
            f"teacher is a {model_type!r} model, which mamba-distill does not support; supported teacher "
            f"model_types: {', '.join(TEACHER_MODEL_TYPES)}"
        )
