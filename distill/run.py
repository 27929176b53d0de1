"""The script `accelerate launch` runs: the whole pipeline for one recipe (`distill.pipeline`).

    accelerate launch distill/run.py recipes/X.yaml [--set KEY=VALUE ...]    (== distill run recipes/X.yaml)
"""

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":
    # As a script, Python puts distill/ first on sys.path, where our module names (data, export, trainer)
    # would shadow real packages for everything imported later. Drop it before importing anything else.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv: list[str] | None = None) -> int:
    from distill.pipeline import add_recipe_arguments, run
    from distill.recipe import load_recipe

    parser = argparse.ArgumentParser(prog="distill run", description=__doc__.splitlines()[0])
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    run(load_recipe(args.recipe, args.set), recipe_path=args.recipe)
    return 0


if __name__ == "__main__":
    from distill.errors import entry_point

    sys.exit(entry_point(main, sys.argv[1:]))
