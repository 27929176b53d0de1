"""The `distill` command (`python -m distill` is the same).

    distill run RECIPE [--set KEY=VALUE ...]     the whole pipeline (== accelerate launch distill/run.py ...)
    distill validate RECIPE [--set ...]          check a recipe and print it with every default filled in
    distill fetch-assets                         download and convert the built-in teacher and data
    distill eval ... | export ... | import-mil ...

User mistakes (`distill.errors.UserError`, which `RecipeError` is) print one `error: ...` line and exit 2.
Subcommands import their heavy modules only when run, so `validate` loads no model, data, torch or accelerate.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distill.errors import entry_point
from distill.pipeline import add_recipe_arguments
from distill.recipe import load_recipe

# subcommands that own their argument parsing: name -> (module, function taking argv)
DELEGATED = {
    "eval": ("distill.eval.cli", "main", "evaluate a checkpoint against its teacher"),
    "export": ("distill.export", "main", "export a checkpoint (native or bamba), optionally push it to a hub"),
    "import-mil": ("distill.import_mil", "main", "convert a MambaInLlama checkpoint to the native format"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distil a Transformer into a hybrid.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (("run", "run a recipe end to end"), ("validate", "check a recipe and print it")):
        add_recipe_arguments(commands.add_parser(name, help=help_text))
    commands.add_parser("fetch-assets", help="download and convert the built-in teacher and data")
    for name, (_, _, help_text) in DELEGATED.items():
        commands.add_parser(name, help=f"{help_text} (see `distill {name} --help`)")
    return parser


def validate(recipe_path: str, overrides: list[str]) -> None:
    from distill.data import check_source
    from distill.teacher import teacher_num_layers

    recipe = load_recipe(recipe_path, overrides)
    recipe.check_against_teacher(teacher_num_layers(recipe.teacher))
    check_source(recipe.data)
    print(recipe.dump(), end="")


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        module, function, _ = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:]) or 0
    args = _parser().parse_args(argv)
    if args.command == "run":
        from distill.pipeline import run

        run(load_recipe(args.recipe, args.set), recipe_path=args.recipe)
    elif args.command == "validate":
        validate(args.recipe, args.set)
    elif args.command == "fetch-assets":
        from distill.teacher import fetch_assets

        for name, path in fetch_assets().items():
            print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry_point(_dispatch, sys.argv[1:] if argv is None else list(argv))
