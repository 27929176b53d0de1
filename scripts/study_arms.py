"""The study's arms: each is the base recipe plus `--set` overrides, with a token budget per stage.

`scripts/study.py` runs them; `tests/test_study.py` checks that every arm is a valid recipe with its budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "recipes/smollm2-135m/study/base.yaml"

# name -> (the comparison it belongs to, its --set overrides on top of the base recipe, its token budget).
# A budget is (layerwise or stepwise tokens, end-to-end tokens); a first stage of 0 tokens is dropped, so
# the e2e-only arm spends the same total on end-to-end KL. Every arm of a comparison has the same total.
SHORT = (1e5, 2e4)
QUARTER = (2.5e4, 5e3)  # the Mamba-1 comparison: its time-stepped CPU scan trains at ~45 tokens/s, 8x slower
LONG = (5e5, 2e5)  # the best 50% recipe at about 1 CPU-hour, for the quality targets
XL = (1e6, 2e5)  # twice LONG's layerwise tokens: the long arm's layerwise held-out loss was still falling
E2E_PILOT = (LONG[0], 4e4)  # end-to-end variants that all start from the long arm's finished layerwise stage
REFERENCE_INIT = ["student.norm_init=ones", "student.conv_init=random"]
# The small-budget levers. `auto` arms align a mixer for every layer on the arm's first budget (the recipe's own
# layerwise stage is dropped: the student's mixers come aligned), score each layer and keep attention where a
# swap hurts most; the 50% and 25% auto arms share one alignment (the cache), but each counts its full cost.
AUTO = ["student.attention_layers=auto", "selection.score_rows=8"]
CACHED = ["stages.0.activations=cached", "stages.0.cache_epochs=4"]
# The 2-CPU-hour targets at 50% and 25% attention, with everything that won at small budget (the demo's recipe
# at study scale): every layer aligned once on 1e5 cached tokens (shared by both arms, counted in full by each),
# then the chosen mixers' own layerwise stage on cached activations, then end-to-end KL. A budget of three parts
# is (alignment of every layer, layerwise of the chosen mixers, end-to-end) tokens, sized to about 1.8 CPU-hours
# with both arms running at once, one core each; 12 epochs keep both caches (about 6 GB each) in 24 GB.
TARGET = [*AUTO, "stages.0.activations=cached", "stages.0.cache_epochs=12", "stages.0.cache_max_gb=8",
          "stages.0.checkpoint_every_tokens=2e5", "stages.1.checkpoint_every_tokens=5e4"]
# the layers `attn25-mamba2-2h` chose from data, fixed, so that arms comparing what comes after share them
CHOSEN25 = ["student.attention_layers=[1, 16, 17, 18, 19, 20, 23, 24]", "student.attention_fraction=null"]

ARMS: dict[str, tuple[str, list[str], tuple[float, ...]]] = {
    "attn50-mamba2-long": ("budget", ["stages.0.checkpoint_every_tokens=1e5", "stages.1.checkpoint_every_tokens=5e4"], LONG),
    "attn50-mamba2-xl": ("budget", ["stages.0.checkpoint_every_tokens=1e5", "stages.1.checkpoint_every_tokens=5e4"], XL),
    "attn50-mamba2": ("base", [], SHORT),
    "attn50-mamba2-reference-init": ("init", REFERENCE_INIT, SHORT),
    "attn50-mamba2-random-init": ("init", ["student.init=random"], SHORT),
    "attn50-mamba2-e2e-only": ("stages", [], (0, sum(SHORT))),
    "attn50-mamba2-stepwise": ("stages", ["stages.0.name=stepwise"], SHORT),
    "attn25-mamba2": ("fraction", ["student.attention_fraction=0.25"], SHORT),
    "attn12-mamba2": ("fraction", ["student.attention_fraction=0.125"], SHORT),
    "attn0-mamba2": ("fraction", ["student.attention_fraction=0.0"], SHORT),
    # more state where no attention is left: each head's state 64 x 128 instead of 64 x 64 (against attn0-mamba2)
    "attn0-mamba2-state128": ("state", ["student.attention_fraction=0.0", "student.mamba2_d_state=128"], SHORT),
    "attn50-mamba1": ("mixer", ["student.mixer=mamba1"], QUARTER),
    "attn50-mamba2-quarter": ("mixer", [], QUARTER),
    "attn50-mamba2-reverse-kl": ("kl", ["stages.1.kl=reverse"], SHORT),
    "attn50-mamba2-jsd": ("kl", ["stages.1.kl=jsd"], SHORT),
    "attn50-mamba2-topk-logits": ("kl", ["stages.1.teacher_logits=topk"], SHORT),
    "attn50-mamba2-e2e-mixers-lr3e-4": ("e2e", [], E2E_PILOT),
    "attn50-mamba2-e2e-mixers-lr1e-3": ("e2e", ["stages.1.lr=1e-3"], E2E_PILOT),
    "attn50-mamba2-e2e-mixers-lr1e-4": ("e2e", ["stages.1.lr=1e-4"], E2E_PILOT),
    "attn50-mamba2-e2e-all-lr3e-4": ("e2e", ["stages.1.trainable=all"], E2E_PILOT),
    "attn50-mamba2-e2e-all-lr1e-4": ("e2e", ["stages.1.trainable=all", "stages.1.lr=1e-4"], E2E_PILOT),
    "attn50-mamba2-auto": ("selection", AUTO, SHORT),
    "attn25-mamba2-auto": ("selection", [*AUTO, "student.attention_fraction=0.25"], SHORT),
    "attn50-mamba2-l2": ("objective", ["stages.0.objective=l2"], SHORT),
    "attn50-mamba2-layer-normalized": ("objective", ["stages.0.objective=layer_normalized_mse"], SHORT),
    "attn50-mamba2-cached": ("activations", CACHED, SHORT),
    "attn50-mamba2-e2e-all-mixer-lr": ("e2e", ["stages.1.trainable=all", "stages.1.lr=3e-5", "stages.1.mixer_lr=3e-4"],
                                       E2E_PILOT),
    "attn50-mamba2-2h": ("target", TARGET, (1e5, 2e6, 2.2e5)),
    "attn25-mamba2-2h": ("target", [*TARGET, "student.attention_fraction=0.25"], (1e5, 1.2e6, 2.2e5)),
    # what each layerwise stage aligns at 25% attention (the 2-CPU-hour arm's data-chosen layers): the attention
    # output on the teacher's inputs (the default), the whole block's output on the teacher's or the student's own
    "attn25-mamba2-chosen": ("inputs", CHOSEN25, SHORT),
    "attn25-mamba2-chosen-block": ("inputs", [*CHOSEN25, "stages.0.target=block_output"], SHORT),
    "attn25-mamba2-chosen-block-student": ("inputs", [*CHOSEN25, "stages.0.target=block_output",
                                                      "stages.0.inputs=student"], SHORT),
    # the target recipe where less attention is left: 4 of 30 layers (chosen from the same scores), and none
    "attn12-mamba2-2h": ("target", [*TARGET, "student.attention_fraction=0.125"], (1e5, 1.2e6, 2.2e5)),
    "attn0-mamba2-2h": ("target", [*TARGET, "student.attention_fraction=0.0"], (1e5, 1.2e6, 2.2e5)),
    # the 0% arm's end-to-end stage training every weight (MLPs, norms, embeddings at lr 3e-5, the mixers at the
    # base's 3e-4), from the 0% arm's finished layerwise stage
    "attn0-mamba2-2h-e2e-all": ("target", [*TARGET, "student.attention_fraction=0.0", "stages.1.trainable=all",
                                           "stages.1.lr=3e-5", "stages.1.mixer_lr=3e-4"], (1e5, 1.2e6, 2.2e5)),
    # the 25% target arm's layerwise tokens over 4x the distinct rows in 3 epochs, its cache on disk
    "attn25-mamba2-2h-disk": ("target", [*TARGET, "student.attention_fraction=0.25", "stages.0.cache_storage=disk",
                                         "stages.0.cache_epochs=3"], (1e5, 1.2e6, 2.2e5)),
    # the 25% target arm's unused CPU time spent on one stage or the other: 1.33x the layerwise tokens (more rows at
    # the same 12 epochs, so a larger cache), or 1.64x the end-to-end tokens; each sized to about 1.9 CPU-hours
    "attn25-mamba2-2h-more-layerwise": ("target", [*(o for o in TARGET if "cache_max_gb" not in o),
                                                   "stages.0.cache_max_gb=10", "student.attention_fraction=0.25"],
                                        (1e5, 1.6e6, 2.2e5)),
    "attn25-mamba2-2h-more-e2e": ("target", [*TARGET, "student.attention_fraction=0.25"], (1e5, 1.2e6, 3.6e5)),
}
# arm -> the arm whose finished layerwise stage it links instead of rerunning (same recipe up to stage 0)
SHARED_FIRST_STAGE = {name: "attn50-mamba2-long" for name, (comparison, _, _) in ARMS.items() if comparison == "e2e"}
SHARED_FIRST_STAGE["attn0-mamba2-2h-e2e-all"] = "attn0-mamba2-2h"


def arm_overrides(name: str, out: Path, scale: float, align_scale: float | None = None) -> list[str]:
    """The `--set` list of one arm: its output folder, its scaled stage budgets and its own overrides.
    `align_scale` scales an `auto` arm's alignment of every layer instead of `scale` (an alignment already cached
    at that budget is then reused, and still counted in full)."""
    _, overrides, budget = ARMS[name]
    sets = [f"output_dir={out / name}"]
    stages = yaml.safe_load(BASE.read_text())["stages"]
    e2e_only = "stages=" + json.dumps([{**stages[1], "max_tokens": int(budget[-1] * scale)}])  # the base's e2e alone
    if budget[0] == 0:  # end-to-end only
        return sets + [e2e_only] + overrides
    if "student.attention_layers=auto" in overrides:  # the first budget aligns every layer
        align_tokens = int(budget[0] * (scale if align_scale is None else align_scale))
        align = {**stages[0], "max_tokens": align_tokens, "activations": "cached", "cache_epochs": 4}
        del align["name"]
        sets.append("selection.align=" + json.dumps(align))
        if len(budget) == 2:  # no layerwise stage of its own: the student's mixers come aligned
            return sets + [e2e_only] + overrides
        budget = budget[1:]
    sets += [f"stages.0.max_tokens={int(budget[0] * scale)}", f"stages.1.max_tokens={int(budget[1] * scale)}"]
    if "stages.0.name=stepwise" not in overrides and not any(o.startswith("stages.0.activations=") for o in overrides):
        sets.append("stages.0.activations=online")  # the arms measured online alignment unless they say cached
    return sets + overrides
