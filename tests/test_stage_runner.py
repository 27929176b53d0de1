"""The stage contract's runner: train once, save final/ then summary.json, skip a finished stage."""

import json

import torch
from test_stages import tiny_hybrid
from test_trainer import make_context, make_recipe


def test_the_runner_trains_once_saves_the_stage_and_skips_it_when_finished(tmp_path, tiny_llama):
    from distill.stages import STAGES, run

    assert {"selection", "layerwise", "stepwise", "end_to_end"} <= set(STAGES)
    recipe = make_recipe(tmp_path, {"name": "end_to_end", "max_tokens": 10})
    ctx = make_context(recipe, tiny_llama)
    calls = []

    def train(stage_ctx, cfg, student, stage_dir):
        calls.append((stage_ctx.seed, stage_ctx.label, stage_dir))
        with torch.no_grad():
            for name, param in student.named_parameters():
                if ".mamba." in name:
                    param.add_(1.0)
        return student, {"tokens": 5}

    stage_dir = tmp_path / "part"
    cfg = recipe.stages[0]
    trained = run(ctx, cfg, tiny_hybrid(tiny_llama), stage_dir, label="part", seed=7, train=train)
    assert calls == [(7, "part", stage_dir)] and (stage_dir / "final" / "config.json").is_file()
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary == {"name": "end_to_end", "tokens": 5, "finished": True}

    again = run(ctx, cfg, tiny_hybrid(tiny_llama), stage_dir, label="part", seed=7, train=train)
    assert len(calls) == 1  # finished: its final weights are loaded, nothing trains
    for (name, value), loaded in zip(trained.state_dict().items(), again.state_dict().values()):
        assert torch.equal(value, loaded), name
