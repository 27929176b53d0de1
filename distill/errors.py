"""The exception types for user mistakes, and how an entry point reports them.

Raise `UserError` (or its subclasses `distill.recipe.RecipeError`, `TrainingError`) with a one-line message
that names the problem and the fix; `entry_point` prints it as `error: ...` and exits 2 without a traceback.
Any other exception is a bug and keeps its traceback.
"""

import logging
import sys
from collections.abc import Callable


class UserError(ValueError):
    """A mistake the user can fix (bad recipe, missing file, unreachable hub); the message is one line."""


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss diverged); the one-line message names the cause and the fix."""


def entry_point(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run an entry point's `command(argv)` with INFO logging to stderr; a `UserError` becomes one
    `error: ...` line and exit status 2, an interrupt status 130."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return command(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
