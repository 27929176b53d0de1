"""Speed where CPU users decode: the teacher and its hybrids in a real llama.cpp, side by side.

    python scripts/bench_llama_cpp.py [--contexts 512 2048 8192 16384] [--rounds 3] [--decode 32]

Writes the built-in teacher (SmolLM2-135M-Instruct) and its 50%, 25% and 0% attention Mamba-2 hybrids
(untrained: speed does not depend on the weights' values) as GGUF with the same exporter in the same outtype
(q8_0 by default; the teacher as llama.cpp's `llama`, the hybrids as `granitehybrid`), then, batch 1, for
every context and round, runs each model once in a fresh llama.cpp process (interleaved: round r runs every
model before round r+1 starts, so a load change on a shared machine hits all of them alike): a prompt of
`context` tokens (prefill), then `--decode` greedy tokens (decode speed: the median token's time). A model is
prefilled once per context: its state is saved (`--state-dir`, default a temporary folder), and every later
round loads it and decodes, so rounds cost decoding only (the teacher's 16k prefill takes 9 minutes on one
thread) and a long prefill can run in one call and the rounds in another. Prints the medians over rounds, the
spread, and each hybrid's ratio to the teacher, and writes eval/results/llama_cpp_speed.json and
eval/results/llama_cpp_speed.png.

Memory: llama.cpp's context state (attention KV cache, f16, sized for the whole context, plus the Mamba conv
and SSM states) and the process's peak RSS (weights mmapped and touched, compute buffers, node itself).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from gguf_agreement import VARIANTS

from distill import llama_cpp
from distill.assets import asset_path
from distill.errors import UserError
from distill.export_gguf import tokenizer_from_gguf, write_gguf
from distill.files import atomic_file, write_text
from distill.init import hybrid_from_teacher
from distill.recipe import StudentConfig, TeacherConfig
from distill.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"teacher": 1.0, "hybrid 50%": 0.5, "hybrid 25%": 0.25, "hybrid 0%": 0.0}


def write_models(
    folder: Path, outtype: str, names: list[str] | None = None, mixed: str | None = None
) -> dict[str, Path]:
    """The models of MODELS named in `names` (default: all) as GGUFs in `folder` (the teacher as a hybrid with
    attention in every layer); a file already there is kept (same seed, same file). `mixed`: a label of
    scripts/gguf_agreement.py's VARIANTS, whose matrices a q8_0 file keeps in f16 (named "model [label]")."""
    keep = {label: kept for label, _, kept in VARIANTS}[mixed] if mixed else ()
    tag = "-" + re.sub(r"[^a-z0-9]+", "-", mixed) if mixed else ""
    files = {name: f"{name.replace(' ', '-').replace('%', '')}-{outtype}{tag}.gguf" for name in MODELS}
    paths = {
        name + (f" [{mixed}]" if mixed else ""): folder / files[name]
        for name in MODELS
        if names is None or name in names
    }
    missing = [name for name, path in paths.items() if not path.is_file()]
    if not missing:
        return paths
    teacher, _ = load_teacher(TeacherConfig(), dtype=torch.float32)
    fields = tokenizer_from_gguf(asset_path("smollm2"))
    for name in missing:
        fraction = MODELS[name.split(" [")[0]]
        student = StudentConfig(
            mixer="mamba2",
            attention_layers="uniform",
            attention_fraction=fraction,
            norm_init="ones",
            conv_init="random",
        )  # no training rows needed
        model = hybrid_from_teacher(teacher, student, seed=0)
        with atomic_file(paths[name]) as tmp:
            write_gguf(model, tmp, outtype, fields, f16_tensors=keep)
    return paths


def measure(
    paths: dict[str, Path],
    contexts: list[int],
    rounds: int,
    decode: int,
    threads: int,
    flash_attention: bool,
    state_dir: Path,
) -> dict:
    """Per model and context: the medians over rounds, and each round's decode tok/s.

    Each model is prefilled once per context and its state saved in `state_dir` (with the prefill's time);
    every later round, in this call or a later one, loads that state in a fresh process and decodes."""
    runs: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in contexts} for name in paths}
    for context in contexts:
        for round_ in range(rounds):
            for name, path in paths.items():
                state = state_dir / f"{path.stem}-{context}{'-fa' if flash_attention else ''}.state"
                prefill = state.with_suffix(".json")
                job = {"kind": "speed", "prompt_tokens": context, "decode_tokens": decode}
                fresh = not state.is_file()
                tmp = state.with_name(f".{state.name}.tmp")
                job |= {"save_state": str(tmp)} if fresh else {"load_state": str(state)}
                answer = llama_cpp.run(
                    path,
                    [job],
                    threads=threads,
                    context=context + decode + 8,
                    flash_attention=flash_attention,
                )
                timing = answer["answers"][0]
                if fresh:  # the prefill's record first: a state file without it is never read
                    write_text(prefill, json.dumps({key: timing[key] for key in ("prefill_s", "tokens")}))
                    tmp.replace(state)
                prefilled = json.loads(prefill.read_text())
                # the same state decodes the same greedy tokens (as many as both calls' --decode asked for)
                shared = min(len(timing["tokens"]), len(prefilled["tokens"]))
                if timing["tokens"][:shared] != prefilled["tokens"][:shared]:
                    raise RuntimeError(f"{name} decodes other tokens from the state loaded from {state}")
                run = {
                    "prefill_tok_s": (context - 1) / prefilled["prefill_s"],
                    "decode_tok_s": 1 / statistics.median(timing["token_s"]),
                    "state_mib": answer["state_bytes"] / 2**20,
                    "peak_rss_mib": answer["rss_bytes"] / 2**20,
                }
                runs[name][context].append(run)
                print(
                    f"  {context:>6} round {round_} {name:<11} prefill {run['prefill_tok_s']:8.1f} tok/s  "
                    f"decode {run['decode_tok_s']:6.1f} tok/s  state {run['state_mib']:7.1f} MiB"
                    + ("  (prefilled here)" if fresh else "  (state loaded)"),
                    flush=True,
                )
    return {
        name: {
            str(c): {key: statistics.median(r[key] for r in rs) for key in rs[0]}
            | {"decode_tok_s_rounds": [r["decode_tok_s"] for r in rs]}
            for c, rs in by_context.items()
        }
        for name, by_context in runs.items()
    }


def table(results: dict, contexts: list[int]) -> str:
    """Medians over rounds; the spread columns give the slowest and fastest round, and the lowest and highest
    ratio of a round's decode to the teacher's in the same round (the rounds interleave the models). Without
    the teacher at a context, the ratio columns read "-"."""
    teacher = results.get("teacher", {})
    lines = [
        (
            "| model | context | prefill tok/s | decode tok/s | decode rounds (min-max) | decode vs teacher "
            "| per round (min-max) | prefill vs teacher | state MiB | peak RSS MiB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_context in results.items():
        for c in map(str, contexts):
            if c not in by_context:  # a context measured for some models only
                continue
            r = by_context[c]
            rounds = r.get("decode_tok_s_rounds", [r["decode_tok_s"]])
            versus = "- | - | -"
            if c in teacher:
                t = teacher[c]
                ratios = [a / b for a, b in zip(rounds, t.get("decode_tok_s_rounds", [t["decode_tok_s"]]))]
                versus = (
                    f"{r['decode_tok_s'] / t['decode_tok_s']:.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x | "
                    f"{r['prefill_tok_s'] / t['prefill_tok_s']:.2f}x"
                )
            lines.append(
                f"| {name} | {int(c):,} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                f"{min(rounds):.1f}-{max(rounds):.1f} | {versus} | "
                f"{r['state_mib']:.1f} | {r['peak_rss_mib']:.0f} |"
            )
    return "\n".join(lines)


def plot(results: dict, contexts: list[int], path: Path, settings: list[dict]) -> None:
    """Decode speed, prefill speed and state size against context, one line per model; the title names the
    outtypes and thread counts of the calls in `settings`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, by_context in results.items():
        for ax, key in zip(axes, ("decode_tok_s", "prefill_tok_s", "state_mib")):
            measured = [c for c in contexts if str(c) in by_context]
            ax.plot(measured, [by_context[str(c)][key] for c in measured], marker="o", label=name)
    for ax, title in zip(
        axes, ("decode tokens/s (batch 1)", "prefill tokens/s", "context state MiB (KV + SSM)")
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    outtypes = "/".join(sorted({str(s.get("outtype", "q8_0")) for s in settings}))
    counts = sorted({int(s.get("threads", 1)) for s in settings})
    threads = "/".join(map(str, counts)) + (" CPU thread" if counts == [1] else " CPU threads")
    fig.suptitle(f"SmolLM2-135M and its Mamba-2 hybrids in llama.cpp ({outtypes}, {threads})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode", type=int, default=32, help="greedy tokens decoded after each prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--outtype", default="q8_0")
    parser.add_argument("--flash-attention", action="store_true", help="llama.cpp's flash attention")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "llama_cpp_speed")
    parser.add_argument(
        "--profile-context",
        type=int,
        default=8192,
        help="after the benchmark, profile the teacher's and the 50%% hybrid's decoding at this context with "
        "perf (scripts/profile_llama_cpp.py) when it is one of --contexts and perf is installed; 0: never",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add these contexts and models to --out's earlier ones (long runs in parts)",
    )
    parser.add_argument(
        "--mixed",
        nargs="+",
        default=[],
        choices=[label for label, outtype, kept in VARIANTS if outtype == "q8_0" and kept],
        help="also measure each model in q8_0 with these matrices in f16 (scripts/gguf_agreement.py's "
        "variants)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="keep the GGUFs and each model's prefilled state here, for later calls: a long prefill can "
        "run in one call and the decode rounds in another (default: a temporary folder)",
    )
    args = parser.parse_args()
    for flag, value in (("--rounds", args.rounds), ("--decode", args.decode), ("--threads", args.threads)):
        if value < 1:  # else an IndexError or StatisticsError after the prefills
            parser.error(f"{flag} {value}: give at least 1")
    reason = llama_cpp.unavailable()
    if reason is not None:
        raise SystemExit(f"error: {reason}")
    with tempfile.TemporaryDirectory() as folder:
        state_dir = args.state_dir or Path(folder)
        state_dir.mkdir(parents=True, exist_ok=True)
        paths = write_models(state_dir, args.outtype, names=args.models)
        for label in args.mixed:
            paths |= write_models(state_dir, args.outtype, names=args.models, mixed=label)
        sizes = {name: path.stat().st_size / 2**20 for name, path in paths.items()}
        results = measure(
            paths, args.contexts, args.rounds, args.decode, args.threads, args.flash_attention, state_dir
        )
        profiled = {name: paths[name] for name in ("teacher", "hybrid 50%") if name in paths}
        if args.profile_context in args.contexts and shutil.which("perf") and not args.flash_attention:
            from profile_llama_cpp import report

            report(profiled, args.profile_context, 48, args.threads, Path(folder), top=12)
    keys = ("contexts", "rounds", "decode", "threads", "outtype", "flash_attention", "models")
    record = {
        "settings": [{key: getattr(args, key) for key in keys}],
        "node_llama_cpp": llama_cpp.NODE_LLAMA_CPP_VERSION,
        "gguf_mib": sizes,
        "results": results,
    }
    json_path = args.out.with_suffix(".json")
    if args.merge and json_path.is_file():
        earlier = json.loads(json_path.read_text())
        record["settings"] = earlier["settings"] + record["settings"]
        record["gguf_mib"] = earlier["gguf_mib"] | record["gguf_mib"]
        for name, by_context in earlier["results"].items():
            record["results"][name] = by_context | record["results"].get(name, {})
    write_text(json_path, json.dumps(record, indent=2) + "\n")  # first: what was measured is kept
    results = record["results"]
    contexts = sorted({int(c) for by_context in results.values() for c in by_context})
    print("\n" + table(results, contexts))
    print("\nGGUF sizes (MiB): " + ", ".join(f"{name} {size:.0f}" for name, size in sizes.items()))
    plot(results, contexts, args.out.with_suffix(".png"), record["settings"])
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # e.g. the teacher's assets missing: one line, as the distill CLI prints it
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
