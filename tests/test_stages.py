"""The stages on a tiny hybrid student built from a tiny Llama teacher, with random packed rows."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE_STUDENT, reordering_bound
from test_trainer import make_context, make_recipe, random_rows
from tolerances import kl_reordering_error, logprob_error, summed, within

torch.set_num_threads(1)  # tiny matmuls: more threads only contend on the shared 2-core box


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny_hybrid(teacher, **student):
    from distill.init import hybrid_from_teacher
    from distill.recipe import StudentConfig

    return hybrid_from_teacher(teacher, StudentConfig(**{**REFERENCE_STUDENT, "attention_fraction": 0.5, "chunk_size": 16, **student}))


def run(tmp_path, teacher, student, stage: dict):
    from distill.stages import run_stage

    online = {"activations": "online"} if stage["name"] == "layerwise" else {}  # the test's own choice otherwise
    recipe = make_recipe(tmp_path, {"batch_size": 4, "held_out_rows": 8, "warmup_ratio": 0.1, **online, **stage})
    ctx = make_context(recipe, teacher)
    student = run_stage(ctx, 0, recipe.stages[0], student)
    summary = json.loads((tmp_path / f"stage0-{stage['name']}" / "summary.json").read_text())
    return student, summary, ctx


def held_out_kl(student, teacher, rows=None) -> float:
    from distill.data import loss_positions, model_inputs
    from distill.losses import distill_kl

    batch = (rows or random_rows(8, seed=2)).with_format("torch")[:]
    with torch.no_grad():
        s = student(**model_inputs(batch)).logits
        t = teacher(**model_inputs(batch)).logits
    return float(distill_kl(s, t, loss_positions(batch["labels"])))


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


# ----------------------------------------------------------------------------- layerwise


def test_teacher_capture_is_each_layers_attention_input_and_output(tiny_llama):
    from distill.alignment import capture_teacher
    from distill.data import model_inputs

    batch = random_rows(3, seed=5).with_format("torch")[:]
    accelerator = make_context(make_recipe("/tmp/unused", {"name": "layerwise", "max_tokens": 10}), tiny_llama).accelerator
    mixer = capture_teacher(accelerator, tiny_llama, [0, 2], "mixer_output")(batch)
    block = capture_teacher(accelerator, tiny_llama, [0, 2], "block_output")(batch)
    with torch.no_grad():
        hidden = tiny_llama.model(**model_inputs(batch), output_hidden_states=True).hidden_states
        for i in (0, 2):
            layer = tiny_llama.model.layers[i]
            normed = layer.input_layernorm(hidden[i])
            # captured inside the forward vs recomputed here: the same ops on the same inputs, the same bits
            assert torch.equal(mixer["inputs"][i], normed)
            attn = layer.self_attn(normed, position_embeddings=tiny_llama.model.rotary_emb(normed, batch["position_ids"]),
                                   attention_mask=None)[0]
            # the captured output is the attention output inside the real (packed, block-diagonal) forward
            residual = hidden[i] + mixer["outputs"][i]
            assert torch.equal(residual + layer.mlp(layer.post_attention_layernorm(residual)), hidden[i + 1])
            assert attn.shape == mixer["outputs"][i].shape
            assert torch.equal(block["inputs"][i], hidden[i]) and torch.equal(block["outputs"][i], hidden[i + 1])
    assert sorted(mixer["inputs"]) == [0, 2]


@pytest.mark.parametrize(("target", "inputs", "activations"), [
    ("mixer_output", "teacher", "online"), ("block_output", "teacher", "online"), ("block_output", "student", "online"),
    ("block_output", "student", "cached"),
])
def test_layerwise_reduces_each_layers_held_out_alignment_loss(tmp_path, tiny_llama, target, inputs, activations):
    student = tiny_hybrid(tiny_llama)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stage = {"name": "layerwise", "max_tokens": 4000, "lr": 1e-2, "target": target, "inputs": inputs,
             "activations": activations, "objective": "token_normalized_mse"}
    student, summary, _ = run(tmp_path, tiny_llama, student, stage)
    assert summary["layers"] == [0, 2]
    for i in summary["layers"]:
        assert summary["held_out_after"][f"layer{i}"] < 0.7 * summary["held_out_before"][f"layer{i}"], summary
    # only the mixers trained; MLPs, norms, embeddings and the attention layers are untouched
    moved = changed(before, student.state_dict())
    assert moved and all(".mamba." in name for name in moved)


def test_student_inputs_run_each_block_on_the_students_own_hidden_states(tmp_path, tiny_llama):
    from distill.alignment import LayerwiseObjective, capture_teacher
    from distill.data import model_inputs
    from distill.losses import alignment_loss

    recipe = make_recipe(tmp_path, {"name": "layerwise", "max_tokens": 10, "target": "block_output",
                                    "inputs": "student"})
    ctx = make_context(recipe, tiny_llama)
    student = tiny_hybrid(tiny_llama)  # Mamba layers 0 and 2
    objective = LayerwiseObjective(student, [0, 2], recipe.stages[0])
    batch = random_rows(3, seed=5).with_format("torch")[:]
    targets = capture_teacher(ctx.accelerator, tiny_llama, [0, 2], "block_output", ("outputs",))(batch)
    assert list(targets) == ["outputs"]  # the student makes its own inputs: only the targets are captured
    outputs = objective.student_block_outputs(batch)
    losses = objective(batch, targets)
    with torch.no_grad():
        hidden = student.model(**model_inputs(batch), output_hidden_states=True).hidden_states
        teacher_hidden = tiny_llama.model(**model_inputs(batch), output_hidden_states=True).hidden_states
    mask = batch["attention_mask"]
    for i in (0, 2):
        # the hooked forward (with autograd) and a plain one are the same sums, perhaps in another order
        delta = reordering_bound(student.config, torch.float32, hidden[i + 1].abs().max())
        within((outputs[i] - hidden[i + 1]).abs().max(), delta, f"layer {i}'s output")
        # a squared error e^2 moves by at most delta * (2|e| + delta) when e moves by delta; the loss sums the
        # channel means over the masked tokens. Plus each loss's own rounding: a sum of n non-negative terms
        # (summed(n) of the result), for both losses
        error = (hidden[i + 1] - targets["outputs"][i])[mask.bool()]
        expected = alignment_loss(hidden[i + 1], targets["outputs"][i], mask, reduction="sum")
        bound = delta * (2 * error.abs().mean(-1) + delta).sum() + 2 * summed(error.numel()) * expected
        within(abs(losses[f"layer{i}"].detach() - expected), bound, f"layer {i}'s loss")
    # layer 2 on the teacher's input (what inputs: teacher trains on) gives another output: a difference above
    # 2 delta cannot be rounding (each side is within delta of exact); 10 delta asks for a clear margin, so the
    # comparison above tells the two modes apart
    with torch.no_grad():
        on_teacher = student.model.layers[2](teacher_hidden[2], position_ids=batch["position_ids"])
    assert (on_teacher - hidden[3]).abs().max() > 10 * delta
    # each block's input is detached: layer 2's loss trains layer 2's mixer and nothing below it
    losses["layer2"].backward()
    assert all(p.grad is None or not p.grad.any() for p in student.model.layers[0].mamba.parameters())
    assert any(p.grad is not None and p.grad.any() for p in student.model.layers[2].mamba.parameters())


def test_cached_and_online_alignment_give_the_same_loss_on_the_same_rows(tmp_path, tiny_llama):
    from distill.alignment import ActivationCache, LayerwiseObjective, MemoryStore, capture_teacher

    recipe = make_recipe(tmp_path, {"name": "layerwise", "max_tokens": 10, "objective": "l2"})
    ctx = make_context(recipe, tiny_llama)
    student = tiny_hybrid(tiny_llama)
    objective = LayerwiseObjective(student, [0, 2], recipe.stages[0])
    capture = capture_teacher(ctx.accelerator, tiny_llama, [0, 2], "mixer_output")
    cache = ActivationCache(capture, MemoryStore(len(ctx.train), row_bytes=1, max_gb=1))
    rows = ctx.train.with_format("torch")
    first = {**rows[[0, 1, 2]], "row": torch.tensor([0, 1, 2])}
    second = {**rows[[2, 5, 0]], "row": torch.tensor([2, 5, 0])}  # rows 0 and 2 come from memory now
    with torch.no_grad():
        cache(first)
        for batch in (first, second):
            # the cache keeps bf16 copies of the captured tensors: the online objective on the same copies is
            # the same computation on the same inputs, so the same bits
            captured = capture(batch)
            rounded = {part: {i: x.bfloat16().float() for i, x in captured[part].items()} for part in captured}
            online, cached = objective(batch, rounded), objective(batch, cache(batch))
            for key in online:
                assert torch.equal(cached[key], online[key]), key
    assert sorted(cache.store.rows) == [0, 1, 2, 5]


def test_cached_activations_that_do_not_fit_are_a_one_line_error(tmp_path, tiny_llama):
    from distill.errors import TrainingError

    stage = {"name": "layerwise", "max_tokens": 4000, "activations": "cached", "cache_max_gb": 1e-6}
    with pytest.raises(TrainingError, match=r"^activations: cached needs .* GiB .* raise cache_epochs[^\n]*$"):
        run(tmp_path, tiny_llama, tiny_hybrid(tiny_llama), stage)


def test_cached_layerwise_runs_the_teacher_once_per_row_and_trains_several_epochs(tmp_path, tiny_llama, monkeypatch):
    from distill import alignment

    captured = []
    original = alignment.capture_teacher

    def counting(*args):
        step = original(*args)
        return lambda batch: captured.extend(batch["row"].tolist()) or step(batch)

    monkeypatch.setattr(alignment, "capture_teacher", counting)
    stage = {"name": "layerwise", "max_tokens": 1200, "lr": 1e-2, "activations": "cached", "cache_epochs": 4,
             "held_out_rows": 0}
    _, summary, ctx = run(tmp_path, tiny_llama, tiny_hybrid(tiny_llama), stage)
    # the cached rows hold the first 1200 / 4 tokens of a permutation (rows have at most 32), and the teacher ran
    # once per row although the stage went over them 4 times
    rows = alignment.cached_rows(ctx.train, ctx.recipe.stages[0], seed=ctx.recipe.seed)
    assert 300 <= sum(sum(mask) for mask in rows["attention_mask"]) < 300 + 32
    assert sorted(captured) == list(range(len(rows))) and summary["tokens"] >= 1200


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_mixers_only_reduces_kl(tmp_path, tiny_llama):
    from distill.data import model_inputs

    student = tiny_hybrid(tiny_llama)
    before_weights = {k: v.clone() for k, v in student.state_dict().items()}
    before = held_out_kl(student, tiny_llama)
    batch = random_rows(8, seed=2).with_format("torch")[:]
    with torch.no_grad():
        before_error = kl_reordering_error(student, tiny_llama, student(**model_inputs(batch)).logits,
                                           tiny_llama(**model_inputs(batch)).logits)
    stage = {"name": "end_to_end", "max_tokens": 4000, "lr": 1e-2, "kl_chunk_tokens": 37}
    student, summary, _ = run(tmp_path, tiny_llama, student, stage)
    assert held_out_kl(student, tiny_llama) < 0.7 * before
    # the same KL over the same rows, batched differently (kl_reordering_error, from the untrained student)
    within(abs(summary["held_out_before"]["loss"] - before), before_error)
    moved = changed(before_weights, student.state_dict())
    assert moved and all(".mamba." in name for name in moved)


def test_end_to_end_lora_merges_back_into_a_plain_student(tmp_path, tiny_llama):
    from distill.modeling_hybrid import HybridForCausalLM

    student = tiny_hybrid(tiny_llama)
    before_weights = {k: v.clone() for k, v in student.state_dict().items()}
    stage = {"name": "end_to_end", "max_tokens": 3000, "lr": 1e-2, "trainable": "lora",
             "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}}
    student, summary, _ = run(tmp_path, tiny_llama, student, stage)
    assert type(student) is HybridForCausalLM and not any("lora" in k for k in student.state_dict())
    moved = changed(before_weights, student.state_dict())
    assert any(".mamba." in n for n in moved) and any("mlp.up_proj" in n for n in moved)
    assert any("self_attn.q_proj" in n for n in moved)
    assert not any("embed" in n or "down_proj" in n or "layernorm" in n for n in moved)
    assert summary["held_out_after"]["loss"] < summary["held_out_before"]["loss"]


@pytest.mark.slow
def test_topk_teacher_cache_is_filled_once_and_reused(tmp_path, tiny_llama, monkeypatch):
    import numpy as np

    monkeypatch.setenv("MAMBA_DISTILL_CACHE", str(tmp_path / "cache"))
    stage = {"name": "end_to_end", "max_tokens": 3000, "lr": 1e-2, "teacher_logits": "topk", "topk": 8,
             "temperature": 2.0}
    _, summary, ctx = run(tmp_path / "a", tiny_llama, tiny_hybrid(tiny_llama), stage)
    assert summary["held_out_after"]["loss"] < summary["held_out_before"]["loss"]  # the exact, full KL
    [cache] = list((tmp_path / "cache" / "teacher_topk").iterdir())
    done = np.load(cache / "done.npy")
    assert done.all()  # 3000 tokens is more than an epoch of the 24 rows
    # the cache holds the teacher's top-8 log-probs at T=2
    batch = ctx.train.with_format("torch")[:2]
    from distill.data import model_inputs

    with torch.no_grad():
        logp = torch.log_softmax(tiny_llama(**model_inputs(batch)).logits / 2.0, -1)
    values, indices = logp.topk(8, -1)
    # the cache's fp32 log-probs come from the same teacher forward, batched differently: logits within
    # reordering_bound on either side, halved by T = 2, then the log-softmax (tolerances.logprob_error)
    logits = tiny_llama(**model_inputs(batch)).logits.detach()
    error = reordering_bound(tiny_llama.config, torch.float32, logits.abs().max().item()) / 2.0
    cached = torch.from_numpy(np.load(cache / "logprobs.npy")[:2])
    within((cached - values).abs().max().item(), 2 * logprob_error(logits / 2.0, error))
    assert torch.equal(torch.from_numpy(np.load(cache / "indices.npy")[:2]).long(), indices)
    # a second run with the same teacher and data reads the cache instead of running the teacher
    mtime = (cache / "logprobs.npy").stat().st_mtime_ns
    calls = {"n": 0}
    forward = type(tiny_llama).forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_llama), "forward", counting)
    run(tmp_path / "b", tiny_llama, tiny_hybrid(tiny_llama), {**stage, "held_out_rows": 0})
    assert calls["n"] == 0 and (cache / "logprobs.npy").stat().st_mtime_ns == mtime


def test_packed_documents_do_not_see_each_other(tiny_llama):
    """The KL objective on a packed row equals the sum over its documents run alone: both models get the
    block-diagonal mask / reset scan from position_ids (this needs use_cache=False, see model_inputs)."""
    from distill.data import loss_positions, model_inputs
    from distill.losses import distill_kl

    student = tiny_hybrid(tiny_llama)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 128, (n,), generator=g) for n in (9, 14, 7)]
    packed = {"input_ids": torch.cat(docs)[None], "position_ids": torch.cat([torch.arange(len(d)) for d in docs])[None]}
    labels = torch.cat([torch.cat([torch.tensor([-100]), d[1:]]) for d in docs])[None]

    def kl_sum(batch, labels):
        with torch.no_grad():
            s = student.model(**model_inputs(batch)).last_hidden_state
            t = tiny_llama.model(**model_inputs(batch)).last_hidden_state
            logits.append((student.lm_head(s), tiny_llama.lm_head(t)))
        return distill_kl(s, t, loss_positions(labels), student_head=student.lm_head.weight,
                          teacher_head=tiny_llama.lm_head.weight, reduction="sum")

    logits = []

    alone = sum(kl_sum({"input_ids": d[None], "position_ids": torch.arange(len(d))[None]},
                       torch.cat([torch.tensor([-100]), d[1:]])[None]) for d in docs)
    # packed vs one document at a time: the same forwards in another order (kl_reordering_error per token,
    # from the packed row's logits), summed over the loss tokens
    packed_sum = kl_sum(packed, labels)
    tokens = int((labels != -100).sum())
    within(abs(float(packed_sum) - float(alone)), tokens * kl_reordering_error(student, tiny_llama, *logits[-1]))


# ----------------------------------------------------------------------------- stepwise


def test_replacement_schedule():
    from distill.stages.stepwise import replacement_schedule

    assert replacement_schedule([0, 2, 4, 6], 2, "top_down") == [[4, 6], [0, 2, 4, 6]]
    assert replacement_schedule([0, 2, 4, 6], 4, "bottom_up") == [[0], [0, 2], [0, 2, 4], [0, 2, 4, 6]]
    assert replacement_schedule([1, 3, 5], 2, "top_down") == [[3, 5], [1, 3, 5]]


def test_partial_student_is_the_teacher_with_nothing_switched_on_and_the_student_with_everything(tiny_llama):
    from distill.data import model_inputs
    from distill.stages.stepwise import partial_student

    student = tiny_hybrid(tiny_llama)
    batch = random_rows(2, seed=3).with_format("torch")[:]
    with torch.no_grad():
        teacher_logits = tiny_llama(**model_inputs(batch)).logits
        none = partial_student(student, tiny_llama, [])
        assert none.config.mixer_types == ["attention"] * 4
        # the same modules and weights, in another model object: the same ops on the same inputs, the same bits
        assert torch.equal(none(**model_inputs(batch)).logits, teacher_logits)
        full = partial_student(student, tiny_llama, [0, 2])
        assert torch.equal(full(**model_inputs(batch)).logits, student(**model_inputs(batch)).logits)


@pytest.mark.slow
def test_stepwise_switches_layers_on_and_reduces_kl(tmp_path, tiny_llama):
    student = tiny_hybrid(tiny_llama, attention_fraction=0.25)
    before = held_out_kl(student, tiny_llama)
    stage = {"name": "stepwise", "max_tokens": 4500, "lr": 1e-2, "num_steps": 3, "order": "top_down",
             "held_out_rows": 0}
    student, summary, _ = run(tmp_path, tiny_llama, student, stage)
    assert summary["schedule"] == [[2], [1, 2], [0, 1, 2]]
    assert [s["step"] for s in summary["substeps"]] == [1, 2, 3]
    assert held_out_kl(student, tiny_llama) < 0.7 * before
    for k in (1, 2, 3):
        assert json.loads((tmp_path / "stage0-stepwise" / f"step{k}" / "summary.json").read_text())["finished"]
    assert Path(tmp_path / "stage0-stepwise" / "final").is_dir()
