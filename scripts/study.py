"""The CPU-scale reproduction study: every arm on the same data, seed and held-out split.

    python scripts/study.py                      # run every arm, then write docs/results.{json,md} + plots
    python scripts/study.py --jobs 2 --threads 1 # two arms at a time, one core each
    python scripts/study.py --scale 0.1 --out outputs/study-smoke --docs outputs/study-smoke/docs
    python scripts/study.py --plan               # print the arms and their budgets, run nothing
    python scripts/study.py --arms attn25-mamba2-2h --scale 0.45 --align-scale 0.6   # a slower machine's 2 hours
    python scripts/study.py --collect-only       # docs from the arms finished so far, start no run

Each arm is the base recipe (`recipes/smollm2-135m/study/base.yaml`) plus `--set` overrides, run with
`distill run` in its own output folder. A finished arm (its `eval/report.json` exists) is skipped, and a
killed arm resumes from its newest checkpoint, so rerunning the same command continues the study.
After the runs, each arm's final checkpoint is scored with lm-eval's stock `hf` model on the shipped
local tasks, and decode speed is measured once per architecture (it does not depend on the weights).

The parts: `study_arms.py` (the arms and their overrides), `study_runs.py` (running an arm, collecting the
results table), `study_report.py` (results.md and the plots). The table persists in docs/results.json, and
rows of arms run on another machine are kept from it (`--table`).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study_arms import ARMS, ROOT, arm_overrides
from study_report import write_report
from study_runs import collect, load_table, run_arm, save_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="arms to run (the docs always cover every finished arm)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every arm's token budget")
    parser.add_argument("--align-scale", type=float, default=None,
                        help="multiply the alignment budget of the arms that choose layers from data (default: "
                             "--scale); an alignment cached at that budget is reused and counted in full")
    parser.add_argument("--jobs", type=int, default=1, help="arms run at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per arm")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/study")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where results.md and the plots go")
    parser.add_argument("--table", type=Path, default=None,
                        help="the persisted results table (default DOCS/results.json): rows of arms whose "
                             "outputs are not under --out are kept from it, and it is rewritten with the new rows")
    parser.add_argument("--lm-eval-limit", type=int, default=200)
    parser.add_argument("--speed-contexts", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--plan", action="store_true", help="print the arms and their overrides, run nothing")
    parser.add_argument("--collect-only", action="store_true",
                        help="write the docs from the arms already finished, start no run")
    args = parser.parse_args()
    if args.plan:
        for name in args.arms:
            print(f"{name:30s} {ARMS[name][0]:9s} " + " ".join(arm_overrides(name, args.out, args.scale, args.align_scale)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.collect_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for status in pool.map(lambda name: run_arm(name, args.out, args.scale, args.threads, args.align_scale), args.arms):
                print(json.dumps(status), flush=True)
    table = args.table or args.docs / "results.json"
    results = collect(args.out, list(ARMS), args.lm_eval_limit, args.speed_contexts, args.threads,
                      load_table(table))
    save_table(table, results)
    write_report(results, args.docs, "python " + " ".join(study_command(sys.argv[1:])))
    print(f"wrote {table} and {args.docs / 'results.md'}")


def study_command(argv: list[str]) -> list[str]:
    """The command that reproduces the whole study: this one without --collect-only and without --arms (which
    only picks the arms this invocation runs)."""
    kept, skipping = [Path(sys.argv[0]).as_posix()], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg == "--arms"
            if arg == "--collect-only" or skipping:
                continue
        if not skipping:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
