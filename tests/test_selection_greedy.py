"""Greedy layer selection (`selection.method: greedy`) on a tiny Llama teacher with random packed rows."""

import itertools
import json

import pytest
import torch
from conftest import REFERENCE_INIT
from test_selection import context
from test_trainer import random_rows
from tolerances import kl_reordering_error, within

torch.set_num_threads(1)  # tiny matmuls: more threads only contend on the shared 2-core box


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_scores_with_layers_already_swapped_are_the_kl_of_that_hybrid(tmp_path, tiny_llama):
    """Against an independent computation: the hybrid with exactly those Mamba layers, run as a model."""
    from distill.data import loss_positions, model_inputs
    from distill.init import hybrid_from_teacher
    from distill.losses import distill_kl
    from distill.recipe import StudentConfig
    from distill.selection import swap_scores
    from distill.trainer import make_accelerator

    ctx = context(tmp_path, tiny_llama)
    every_layer = StudentConfig(**REFERENCE_INIT, attention_layers=[], chunk_size=16)
    full = hybrid_from_teacher(tiny_llama, every_layer, seed=3)
    mixers = {i: layer.mamba for i, layer in enumerate(full.model.layers)}
    rows = random_rows(6, length=64, seed=4)
    scores = swap_scores(make_accelerator(ctx.recipe), tiny_llama, mixers, rows, batch_size=4,
                         candidates=[0, 3], swapped=[2])
    batch = rows.with_format("torch")[:]
    for score, layer in zip(scores, (0, 3)):
        hybrid = hybrid_from_teacher(tiny_llama, StudentConfig(
            **REFERENCE_INIT, attention_layers=[i for i in range(4) if i not in (2, layer)], chunk_size=16))
        for i in (2, layer):
            hybrid.model.layers[i].mamba.load_state_dict(full.model.layers[i].mamba.state_dict())
        with torch.no_grad():
            logits = hybrid(**model_inputs(batch)).logits, tiny_llama(**model_inputs(batch)).logits
        kl = distill_kl(*logits, loss_positions(batch["labels"]))
        # fp32 forwards of the same ops in another batching (tolerances.kl_reordering_error)
        within(abs(score - float(kl)), kl_reordering_error(hybrid, tiny_llama, *logits))


def test_greedy_with_one_layer_to_swap_chooses_what_single_swap_scores_choose(tmp_path, tiny_llama,
                                                                              monkeypatch):
    from distill import selection

    single, _ = selection.prepare_student(context(tmp_path / "single", tiny_llama, fraction=0.75,
                                                  cache_dir=str(tmp_path / "cache")), None)

    def forbidden(*args, **kwargs):
        raise AssertionError("the first greedy step reuses the single-swap scores")

    monkeypatch.setattr(selection, "swap_scores", forbidden)
    greedy, _ = selection.prepare_student(context(tmp_path / "greedy", tiny_llama, fraction=0.75,
                                                  method="greedy", cache_dir=str(tmp_path / "cache")), None)
    assert len(greedy.student.attention_layers) == 3
    assert greedy.student.attention_layers == single.student.attention_layers
    record = json.loads((tmp_path / "greedy" / "out" / "selection" / "scores.json").read_text())
    assert record["method"] == "greedy" and len(record["greedy"]) == 1


def interacting_kl(swapped: set[int]) -> float:
    """A made-up KL of the teacher with `swapped` layers on mixers: each layer costs its own amount, and
    layers 0 and 1 together cost 5 more (say both carry one long-range dependency, and either suffices)."""
    return sum((1.0, 1.1, 2.0, 3.0)[i] for i in swapped) + 5.0 * ({0, 1} <= swapped)


def test_greedy_finds_the_best_set_where_single_swap_scores_mislead(tmp_path, tiny_llama, monkeypatch):
    """A real tiny model whose aligned mixers provably interact is hard to build, so the interaction is
    planted in the scores (the selection's plumbing around them is the real one): single-swap scores keep
    attention at layers 2 and 3 (KL 7.1 with 0 and 1 swapped), the best pair over all six is 1 and 3
    (KL 3.0)."""
    from distill import selection

    calls = []

    def scores(accelerator, teacher, mixers, rows, batch_size, candidates=None, swapped=()):
        calls.append(list(swapped))
        return [interacting_kl({*swapped, i}) for i in sorted(candidates or mixers)]

    monkeypatch.setattr(selection, "swap_scores", scores)
    layers = range(4)
    best = min(itertools.combinations(layers, 2), key=lambda kept: interacting_kl(set(layers) - set(kept)))
    single, _ = selection.prepare_student(context(tmp_path / "single", tiny_llama, fraction=0.5,
                                                  cache_dir=str(tmp_path / "cache")), None)
    assert single.student.attention_layers == [2, 3] and list(best) == [1, 3]
    greedy_ctx = context(tmp_path / "greedy", tiny_llama, fraction=0.5, method="greedy",
                         cache_dir=str(tmp_path / "cache"))
    greedy, student = selection.prepare_student(greedy_ctx, None)
    assert greedy.student.attention_layers == list(best)
    assert student.config.mixer_types == ["mamba2", "attention", "mamba2", "attention"]
    # the first step reused the single-swap scores; the second re-scored layers 1-3 with layer 0 swapped
    assert calls == [[], [0]]
    # a lower fraction extends the cached steps rather than redoing them
    calls.clear()
    selection.prepare_student(context(tmp_path / "quarter", tiny_llama, fraction=0.25, method="greedy",
                                      cache_dir=str(tmp_path / "cache")), None)
    assert calls == [[0, 2]]
    # no attention to keep: nothing to choose, nothing scored
    calls.clear()
    none, _ = selection.prepare_student(context(tmp_path / "none", tiny_llama, fraction=0.0, method="greedy",
                                                cache_dir=str(tmp_path / "cache")), None)
    assert none.student.attention_layers == [] and calls == []
