"""Teacher families beyond Llama: tiny random Llama 3.x, Mistral, Qwen2, Qwen3 and SmolLM3 teachers, built with
transformers' own config classes, each with the feature that sets it apart switched on and exercised."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REFERENCE_INIT, REFERENCE_STUDENT, clear_greedy, left_padded, reordering_bound
from test_stages import run, tiny_hybrid
from tolerances import kl_reordering_error, summed, within
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from distill.errors import UserError
from distill.init import hybrid_config_from_teacher, hybrid_from_teacher
from distill.modeling_hybrid import FAMILIES, HybridForCausalLM, repeat_heads
from distill.recipe import RecipeError, StudentConfig

torch.set_num_threads(1)  # tiny matmuls: more threads only contend on the shared 2-core box

COMMON = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "attn_implementation": "sdpa",
}
WINDOW = 5  # shorter than the test sequences, so sliding layers see fewer tokens than full ones
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# At attention_fraction 0.5 layers 1 and 3 keep attention: each family's feature is in a kept layer.
CONFIGS = {
    "llama3": lambda: LlamaConfig(**COMMON, head_dim=16, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
    "mistral": lambda: MistralConfig(**COMMON, head_dim=16, sliding_window=WINDOW, tie_word_embeddings=False),
    # q/k/v biases; layers >= max_window_layers slide
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                                 tie_word_embeddings=True),
    # q/k norms; head_dim 24: nh * hd = 96 != hidden_size (Qwen3-0.6B has 2048 != 1024)
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True),
    # layer 3 has no RoPE
    "smollm3": lambda: SmolLM3Config(**COMMON, no_rope_layer_interval=4, tie_word_embeddings=True),
}


def teacher_model(family: str):
    """A seeded tiny teacher whose norms and biases are random too (zeros and ones would hide a dropped one)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def perturb_mixers(student, seed: int = 1):
    """Perturb every Mamba parameter, so that all of them show in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if ".mamba." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return student.eval()


def ids_and_mask(length: int = 16):
    ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second row is left-padded
    return ids, mask


# ----------------------------------------------------------------------------- config and init


@pytest.mark.parametrize("family", CONFIGS)
def test_zero_mamba_student_is_the_teacher(family):
    teacher = teacher_model(family)
    student = hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, attention_fraction=1.0)).eval()
    for mine, theirs in zip(student.model.layers, teacher.model.layers):
        assert type(mine.self_attn) is type(theirs.self_attn) and type(mine.mlp) is type(theirs.mlp)
    assert student.config.tie_word_embeddings == teacher.config.tie_word_embeddings
    ids, mask = ids_and_mask()
    with torch.no_grad():
        for kwargs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
            want, got = teacher(**kwargs).logits, student(**kwargs).logits
            # same modules, same weights, same masks: only the order of fp32 sums may differ
            assert (got - want).abs().max() <= reordering_bound(teacher.config, torch.float32, want.abs().max()), family


# What sets each family apart, switched off: the teacher must then compute something else (else the tests above
# could not tell whether the student carries it over).
WITHOUT_FEATURE = {
    "llama3": lambda c: setattr(c, "rope_parameters", {"rope_type": "default", "rope_theta": 500000.0}),
    "mistral": lambda c: setattr(c, "sliding_window", None),
    "qwen2": lambda c: (setattr(c, "sliding_window", None), setattr(c, "layer_types", ["full_attention"] * 4)),
    "qwen3": None,  # q/k norms cannot be switched off; their random weights are checked to matter instead
    "smollm3": lambda c: setattr(c, "no_rope_layers", [1, 1, 1, 1]),
}


@pytest.mark.parametrize("family", CONFIGS)
def test_each_tiny_teacher_exercises_its_feature(family):
    teacher = teacher_model(family)
    config = CONFIGS[family]()
    if WITHOUT_FEATURE[family] is not None:
        WITHOUT_FEATURE[family](config)
    plain = AutoModelForCausalLM.from_config(config).eval()
    plain.load_state_dict(teacher.state_dict())
    if family == "qwen3":
        with torch.no_grad():
            for layer in plain.model.layers:
                layer.self_attn.q_norm.weight.fill_(1.0)
                layer.self_attn.k_norm.weight.fill_(1.0)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        assert (teacher(ids).logits - plain(ids).logits).abs().max() > 1e-3


def test_family_fields_carry_over():
    llama = hybrid_config_from_teacher(CONFIGS["llama3"](), StudentConfig(**REFERENCE_STUDENT))
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["factor"] == 8.0
    assert not llama.tie_word_embeddings and not llama.mamba_proj_bias
    mistral = hybrid_config_from_teacher(CONFIGS["mistral"](), StudentConfig(**REFERENCE_STUDENT))
    assert mistral.sliding_window == WINDOW
    assert mistral.layer_types == ["linear_attention", "sliding_attention"] * 2
    qwen2 = hybrid_config_from_teacher(CONFIGS["qwen2"](), StudentConfig(**REFERENCE_STUDENT))
    assert qwen2.layer_types == ["linear_attention", "full_attention", "linear_attention", "sliding_attention"]
    assert qwen2.mamba_proj_bias
    qwen3 = hybrid_config_from_teacher(CONFIGS["qwen3"](), StudentConfig(**REFERENCE_STUDENT))
    assert qwen3.head_dim == 24 and qwen3.mamba_bc_norm and not qwen3.mamba_proj_bias
    assert not hybrid_config_from_teacher(CONFIGS["qwen3"](), StudentConfig(**REFERENCE_STUDENT, bc_norm=False)).mamba_bc_norm
    smol = hybrid_config_from_teacher(CONFIGS["smollm3"](), StudentConfig(**REFERENCE_STUDENT))
    assert smol.no_rope_layers == [1, 1, 1, 0] and smol.sliding_window is None


def test_unsupported_family_is_one_line_naming_it():
    with pytest.raises(RecipeError) as err:
        hybrid_config_from_teacher(GemmaConfig(**COMMON), StudentConfig(**REFERENCE_STUDENT))
    message = str(err.value)
    assert "'gemma'" in message and "llama, mistral, qwen2, qwen3, smollm3" in message and "\n" not in message


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_biases_and_qk_norms_land_in_the_mixer(family, mixer):
    """in_proj's C and B rows (bias and, for Qwen3, the per-head norm) give exactly the teacher's q and k."""
    teacher = teacher_model(family)
    student = hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_INIT, mixer=mixer, attention_layers=[1, 3]))
    u = torch.randn(2, 7, 64)
    with torch.no_grad():
        for i in (0, 2):
            attn, mamba = teacher.model.layers[i].self_attn, student.model.layers[i].mamba
            hd = attn.head_dim
            q, k, v = attn.q_proj(u), attn.k_proj(u), attn.v_proj(u)
            if family == "qwen3":
                q = attn.q_norm(q.unflatten(-1, (-1, hd))).flatten(-2)
                k = attn.k_norm(k.unflatten(-1, (-1, hd))).flatten(-2)
            if mixer == "mamba2":
                _, xbc, _ = mamba._project(u)
                x, B, C = xbc.split([mamba.d_xb, mamba.d_xb, mamba.d_inner], dim=-1)
            else:  # Mamba-1's x and B come repeated to every head, as GQA repeats v and k
                _, x, B, C, _ = mamba._project(u)
                v, k = repeat_heads(v, 2, 2), repeat_heads(k, 2, 2)
            # the same affine maps on the same input, as rows of one larger matmul: each a 64-term dot product
            # (plus bias) within summed(64) of |u| @ |W|.T + |b| on either side; Qwen3's per-head RMS norm then
            # scales that error by at most twice its gain over the row's RMS, and rounds by summed(head_dim)
            for got, want, proj, norm in ((x, v, attn.v_proj, None), (B, k, attn.k_proj, "k_norm"),
                                          (C, q, attn.q_proj, "q_norm")):
                magnitude = u.abs() @ proj.weight.abs().T + (proj.bias.abs() if proj.bias is not None else 0)
                bound = 2 * summed(64 + 1) * magnitude
                if family == "qwen3" and norm:
                    pre = proj(u).unflatten(-1, (-1, hd))
                    normed = getattr(attn, norm)(pre)
                    gain = getattr(attn, norm).weight.abs().max() / pre.pow(2).mean(-1, keepdim=True).sqrt()
                    bound = (2 * gain * bound.unflatten(-1, (-1, hd)).amax(-1, keepdim=True)
                             + summed(hd) * normed.abs()).flatten(-2)
                if bound.shape != want.shape:  # Mamba-1: v and k repeated to every head above
                    bound = repeat_heads(bound, 2, 2)
                within(((got - want).abs() / bound).max().item(), 1.0, norm or "x")
            assert torch.equal(mamba.out_proj.weight, attn.o_proj.weight)
            if family == "qwen3":  # no biases anywhere
                assert mamba.in_proj.bias is None and mamba.out_proj.bias is None
                continue
            bias, dt_rows = mamba.in_proj.bias, mamba.in_proj.out_features - 2 * (mamba.d_inner + mamba.d_xb)
            assert torch.equal(bias[: mamba.d_inner], torch.zeros(mamba.d_inner))  # z rows
            assert torch.equal(bias[-dt_rows:], torch.zeros(dt_rows))  # dt rows
            assert torch.equal(mamba.out_proj.bias, torch.zeros(64))  # Qwen2's o_proj has no bias


# ----------------------------------------------------------------------------- training, generation, save/load


@pytest.mark.parametrize("family", CONFIGS)
def test_layerwise_loss_falls(tmp_path, family):
    teacher = teacher_model(family)
    student = tiny_hybrid(teacher)
    stage = {"name": "layerwise", "max_tokens": 3000, "lr": 1e-2}
    student, summary, _ = run(tmp_path, teacher, student, stage)
    assert summary["layers"] == [0, 2]
    for i in summary["layers"]:
        assert summary["held_out_after"][f"layer{i}"] < 0.8 * summary["held_out_before"][f"layer{i}"], summary


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
@pytest.mark.parametrize("family", CONFIGS)
def test_batched_left_padded_generation_equals_unbatched(family, mixer):
    teacher = teacher_model(family)
    student = perturb_mixers(hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, mixer=mixer, attention_fraction=0.5)))
    student.generation_config.pad_token_id = 0
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    greedy = {"max_new_tokens": 8, "do_sample": False}  # 7 + 8 tokens: past the sliding window of 5
    with torch.no_grad():
        batched = student.generate(ids, attention_mask=mask, **greedy)
        for row, prompt in enumerate(prompts):
            alone = clear_greedy(student, prompt[None], max_new_tokens=8)
            assert torch.equal(batched[row, width:], alone[0, len(prompt) :]), row
            assert torch.equal(alone, student.generate(prompt[None], use_cache=False, **greedy)), row


@pytest.mark.parametrize("family", CONFIGS)
def test_save_then_load_is_bit_exact(tmp_path, family):
    teacher = teacher_model(family)
    student = perturb_mixers(hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, attention_fraction=0.5)))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    saved = {k: v for k, v in student.config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"} == saved
    want, got = student.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        assert torch.equal(student(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


REMOTE = textwrap.dedent(
    """
    import sys, torch
    sys.modules["distill"] = None  # any import of our package fails
    from transformers import AutoModelForCausalLM
    for folder in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        want = torch.load(folder + "/want.pt")
        with torch.no_grad():
            got = model(want["ids"]).logits
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        # another process, maybe other kernels' blocking: the same sums in another order (reordering_bound)
        assert (got - want["logits"]).abs().max() <= want["bound"], folder
    print("ok")
    """
)


def test_remote_code_loads_every_family_without_our_package(tmp_path):
    folders = []
    for family in CONFIGS:
        student = perturb_mixers(hybrid_from_teacher(teacher_model(family), StudentConfig(**REFERENCE_STUDENT, attention_fraction=0.5)))
        folder = tmp_path / family
        student.save_pretrained(folder)
        ids, _ = ids_and_mask()
        with torch.no_grad():
            logits = student(ids).logits
            bound = reordering_bound(student.config, torch.float32, logits.abs().max().item())
            torch.save({"ids": ids, "logits": logits, "bound": bound}, folder / "want.pt")
        folders.append(str(folder))
    (tmp_path / "remote.py").write_text(REMOTE)
    result = subprocess.run([sys.executable, str(tmp_path / "remote.py"), *folders], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_families_table_matches_the_config():
    from distill.families import TEACHER_MODEL_TYPES

    assert tuple(FAMILIES) == TEACHER_MODEL_TYPES


# ----------------------------------------------------------------------------- Bamba export


@pytest.mark.parametrize("family", ["llama3", "mistral-no-window"])
def test_bamba_export_of_expressible_families_equals_native(tmp_path, family):
    from test_export import char_tokenizer
    from transformers import BambaForCausalLM

    from distill.export import export

    if family == "mistral-no-window":
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(MistralConfig(**COMMON, head_dim=16, sliding_window=None)).eval()
    else:
        teacher = teacher_model(family)
    student = perturb_mixers(hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, attention_fraction=0.5)))
    student.save_pretrained(tmp_path / "ckpt")
    char_tokenizer().save_pretrained(tmp_path / "ckpt")
    out = export(tmp_path / "ckpt", "bamba", tmp_path / "bamba")  # itself compares logits on a random sequence
    bamba = BambaForCausalLM.from_pretrained(out).eval()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        # the same computation, with x and B repeated to full width: the same sums in another order
        want = student(ids, attention_mask=mask).logits
        bound = reordering_bound(student.config, torch.float32, want.abs().max().item())
        assert (bamba(ids, attention_mask=mask).logits - want).abs().max() <= bound
        # and padding does not leak into the padded row (it would with in_proj biases, which are refused)
        assert (bamba(ids, attention_mask=mask).logits[1, 4:] - bamba(ids[1:, 4:]).logits[0]).abs().max() <= bound


@pytest.mark.parametrize(
    ("family", "student", "feature"),
    [
        ("qwen3", {"attention_fraction": 0.5}, r"per-head q/k norms \(Qwen3's q_norm/k_norm\) in attention layers \[1, 3\]"),
        ("qwen3", {"attention_fraction": 0.0}, r"per-head RMSNorm on the mixers' B and C"),
        ("mistral", {"attention_fraction": 0.5}, r"sliding-window attention \(5 tokens\) in layers \[1, 3\]"),
        ("qwen2", {"attention_fraction": 0.5}, r"sliding-window attention \(5 tokens\) in layers \[3\]"),
        ("qwen2", {"attention_layers": [1]}, r"^Bamba cannot express biases on the mixers' in_proj"),
        ("smollm3", {"attention_fraction": 0.5}, r"attention without RoPE \(SmolLM3's NoPE\) in layers \[3\]"),
    ],
)
def test_bamba_refuses_what_it_cannot_express(tmp_path, family, student, feature):
    from distill.export import export

    model = hybrid_from_teacher(teacher_model(family), StudentConfig(**{**REFERENCE_STUDENT, **student}))
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(UserError, match=feature) as err:
        export(tmp_path / "ckpt", "bamba", tmp_path / "bamba")
    assert "\n" not in str(err.value) and "--format native" in str(err.value)
    assert not (tmp_path / "bamba").exists()


def test_qwen3_without_attention_or_bc_norm_is_expressible_but_needs_hidden_width():
    """Without kept attention and B/C norms nothing Qwen3-specific is left; its head_dim still stops Bamba."""
    from distill.export import bamba_config

    config = hybrid_config_from_teacher(CONFIGS["qwen3"](), StudentConfig(**REFERENCE_STUDENT, attention_fraction=0.0, bc_norm=False))
    with pytest.raises(UserError, match=r"num_attention_heads\*head_dim = 4\*24 != hidden_size = 64"):
        bamba_config(config)


def test_config_round_trips_through_json(tmp_path):
    config = hybrid_config_from_teacher(CONFIGS["smollm3"](), StudentConfig(**REFERENCE_STUDENT))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["teacher_model_type"] == "smollm3" and saved["no_rope_layers"] == [1, 1, 1, 0]
    assert isinstance(HybridForCausalLM(type(config).from_pretrained(tmp_path)), HybridForCausalLM)


# ----------------------------------------------------------------------------- the whole pipeline


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "mistral"])  # q/k norms; sliding windows (KV cache in eval)
def test_pipeline_runs_on_each_family(tmp_path, monkeypatch, family):
    """distill run on a tiny teacher of the family: layerwise, end-to-end, eval (lm-eval, decode speed), export."""
    from conftest import make_tiny_tokenizer

    from distill.pipeline import run as distill_run
    from distill.recipe import recipe_from_dict

    monkeypatch.setenv("MAMBA_DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = CONFIGS[family]()
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = 258, 256, 257, 257
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "teacher")
    make_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(120)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = recipe_from_dict({
        "teacher": {"source": "teacher"},
        "student": {**REFERENCE_STUDENT, "attention_fraction": 0.5, "chunk_size": 16},
        "data": {"source": "chat.jsonl", "max_length": 128, "held_out_size": 4},
        "stages": [{"name": "layerwise", "max_tokens": 1000, "batch_size": 4, "activations": "online"},
                   {"name": "end_to_end", "max_tokens": 1000, "batch_size": 4}],
        "eval": {"max_sequences": 4, "lm_eval_tasks": ["sharegpt_ppl"], "lm_eval_limit": 2, "speed": True,
                 "speed_contexts": [16], "speed_batch_sizes": [2], "speed_steps": 2},
        "output_dir": "out",
    })
    out = distill_run(recipe)
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["student"]["kl_to_teacher"] > 0 and report["student"]["perplexity"] > 0
    final = AutoModelForCausalLM.from_pretrained(out / "export" / "native", trust_remote_code=True)
    assert final.config.teacher_model_type == config.model_type


# ----------------------------------------------------------------------------- layer selection


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("swapped", [(), (2,)], ids=["single", "greedy_step"])
def test_swap_scores_replay_the_layers_before_the_swap(family, swapped):
    """`swap_scores` replays the layers before each swapped one from a recorded forward instead of running
    them. Against whole forwards of the teacher with the swaps in place, on packed rows longer than the
    sliding window, so each family's masks and per-layer types (sliding, NoPE) must line up with the layers:
    the final hidden states, and the scores."""
    from test_trainer import random_rows

    from distill.data import loss_positions, model_inputs
    from distill.losses import distill_kl
    from distill.recipe import recipe_from_dict
    from distill.selection import forward_from, recording_layer_inputs, swap_attention, swap_scores
    from distill.trainer import make_accelerator

    teacher = teacher_model(family)
    config = StudentConfig(**{**REFERENCE_STUDENT, "attention_layers": []})
    student = perturb_mixers(hybrid_from_teacher(teacher, config))
    mixers = {i: layer.mamba for i, layer in enumerate(student.model.layers)}
    rows = random_rows(6, length=16, seed=4)
    accelerator = make_accelerator(recipe_from_dict({"stages": [{"name": "end_to_end", "max_tokens": 1}]}))
    candidates = [i for i in mixers if i not in swapped]
    scores = swap_scores(accelerator, teacher, mixers, rows, batch_size=4, candidates=candidates, swapped=swapped)

    batch = rows.with_format("torch")[:]
    inputs, mask, position_ids = model_inputs(batch), loss_positions(batch["labels"]), batch["position_ids"]
    with torch.no_grad():
        reference = teacher(**inputs).logits
        for score, layer in zip(scores, candidates, strict=True):
            handles = [swap_attention(teacher, i, mixers[i], position_ids) for i in (*swapped, layer)]
            try:
                with recording_layer_inputs(teacher) as entering:
                    whole = teacher.model(**inputs).last_hidden_state
                logits = teacher.lm_head(whole)
                replayed = forward_from(teacher, layer, entering, inputs)
            finally:
                for handle in handles:
                    handle.remove()
            # the same fp32 ops on the same inputs: equal up to the order of their sums
            scale = whole.abs().max().item()
            within((replayed - whole).abs().max().item(), reordering_bound(teacher.config, torch.float32, scale))
            # and the score, over batches of 4 rows instead of 6
            kl = float(distill_kl(logits, reference, mask))
            within(abs(score - kl), kl_reordering_error(teacher, teacher, logits, reference))
