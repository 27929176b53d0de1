"""The exception types for user mistakes.

Raise `UserError` (or its subclasses `distill.recipe.RecipeError`, `TrainingError`) with a one-line message that names the
problem and the fix; the `distill` CLI prints it as `error: ...` and exits 2 without a traceback. Any other
exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake the user can fix (bad recipe, missing file, unreachable hub); the message is one line."""


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss diverged); the message is one line naming the cause and the fix."""
