"""lm-eval on any checkpoint (teacher folder, native hybrid, Bamba export) through lm-eval's stock `hf` model.

Runs offline (`HF_HUB_OFFLINE=1`). Task names are either our shipped tasks in `eval/tasks/` (local JSONL,
see `distill.eval.make_tasks`) or any standard lm-eval task whose data is already in the local HF cache.
Chat models get their chat template on generative tasks only: log-likelihood tasks score raw text, as the
standard task definitions intend.

    python -m distill.eval.lm_eval_runner CHECKPOINT_DIR --tasks sharegpt_ppl sharegpt_next_sentence
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from distill.errors import UserError

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = sorted(path.stem for path in TASKS_DIR.glob("*.yaml"))


def _task_spec(name: str) -> str | dict:
    """A shipped task as a config dict with its data file made absolute; any other name unchanged."""
    if name not in LOCAL_TASKS:
        return name
    config = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / path) for split, path in files.items()}
    return config


def _load_lm(model, tokenizer, batch_size: int, device: str, dtype: str):
    from lm_eval.models.huggingface import HFLM

    import distill.modeling_hybrid  # noqa: F401  (registers the hybrid with the Auto classes)

    if isinstance(model, (str, Path)):
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise UserError(
                f"{folder} is not a checkpoint folder (no config.json); pass a save_pretrained folder"
            )
        return HFLM(
            pretrained=str(folder), dtype=dtype, device=device, batch_size=batch_size, trust_remote_code=True
        )
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_lm_eval(
    model,
    tasks: list[str],
    *,
    tokenizer=None,
    limit: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "float32",
    log_samples: bool = False,
) -> dict:
    """Evaluate `model` (a checkpoint folder, or a loaded model plus `tokenizer`) on `tasks`.

    Returns lm-eval's output with `results` (metric name -> value per task); `samples` too if asked.
    """
    if not tasks:
        raise UserError(f"no lm-eval tasks given; pass task names, e.g. {' '.join(LOCAL_TASKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    kinds = {}
    for name in tasks:  # load the tasks first: a bad name fails before the model is read
        try:
            loaded = manager.load([_task_spec(name)])["tasks"]
        except (KeyError, ValueError, OSError) as err:  # unknown name; data not in the offline cache
            raise UserError(
                f"lm-eval task {name!r} could not be loaded offline ({type(err).__name__}: {err}); "
                f"use one of "
                f"{', '.join(LOCAL_TASKS)} or a standard task whose data is in the local HF cache"
            ) from None
        kinds[name] = {task.get_config("output_type") for task in loaded.values()}
    lm = _load_lm(model, tokenizer, batch_size, device, dtype)
    chat = getattr(lm.tokenizer, "chat_template", None) is not None
    templated = {name: chat and kinds[name] == {"generate_until"} for name in tasks}
    merged: dict = {"results": {}, "samples": {}}
    for use_template in (False, True):
        specs = [_task_spec(name) for name in tasks if templated[name] == use_template]
        if not specs:
            continue
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            task_manager=manager,
            limit=limit,
            apply_chat_template=use_template,
            log_samples=log_samples,
            bootstrap_iters=0,
        )
        merged["results"].update(out["results"])
        merged["samples"].update(out.get("samples", {}))
    if not log_samples:
        del merged["samples"]
    return merged


def summarize(results: dict) -> dict:
    """`{task: {metric: value}}` without lm-eval's `,none` filter suffix and stderr entries."""
    return {
        task: {
            key.split(",")[0]: value
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))
        }
        for task, metrics in results.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run lm-eval on a checkpoint folder, offline.")
    parser.add_argument(
        "checkpoint", help="a save_pretrained folder (teacher, native hybrid or Bamba export)"
    )
    parser.add_argument("--tasks", nargs="+", default=LOCAL_TASKS)
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    results = summarize(
        run_lm_eval(
            args.checkpoint, args.tasks, limit=args.limit, batch_size=args.batch_size, device=args.device
        )["results"]
    )
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
