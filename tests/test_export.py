"""Export: native folder with remote code, lossless stock Bamba, model card, hub push, clear refusals."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REFERENCE_STUDENT, clear_greedy, reordering_bound
from tolerances import logit_scale, logprob_error, within

from distill.errors import UserError
from distill.export import export, main
from distill.recipe import StudentConfig


def char_tokenizer():
    """A 99-token character-level tokenizer (fits the tiny vocab of 128) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {chr(c): c - 28 for c in range(32, 127)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    return tokenizer


def make_hybrid(teacher, mixer="mamba2", seed=0, **student):
    """A hybrid from `teacher` whose freshly initialised mixer parameters are all perturbed (so all matter)."""
    from distill.init import hybrid_from_teacher

    model = hybrid_from_teacher(teacher, StudentConfig(**{**REFERENCE_STUDENT, "mixer": mixer, **student}), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mamba." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture
def checkpoint(tmp_path, tiny_llama):
    """A run folder like `distill run` leaves: final/ (model + tokenizer), recipe.yaml, eval/report.json."""
    model = make_hybrid(tiny_llama, attention_layers=[1])
    final = tmp_path / "run" / "final"
    model.save_pretrained(final)
    char_tokenizer().save_pretrained(final)
    (tmp_path / "run" / "recipe.yaml").write_text(
        "stages:\n  - {name: layerwise, max_tokens: 2e4}\n  - {name: end_to_end, max_tokens: 50k}\n"
    )
    (tmp_path / "run" / "eval").mkdir()
    report = {
        "teacher": {"perplexity": 12.5},
        "student": {"perplexity": 14.25, "kl_to_teacher": 0.31, "top1_agreement": 0.77},
        "stages": [],
    }
    (tmp_path / "run" / "eval" / "report.json").write_text(json.dumps(report))
    return final, model


def _batch():
    """Two rows, the second left-padded by 3."""
    ids = torch.randint(4, 128, (2, 13), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("d_state", [None, 24], ids=["head-dim-state", "wider-state"])
def test_bamba_export_equals_native(checkpoint, tmp_path, tiny_llama, d_state):
    from transformers import AutoModelForCausalLM, BambaForCausalLM

    final, native = checkpoint
    if d_state:  # head_dim 16: B and C 24 wide per head (Bamba's mamba_d_state)
        native = make_hybrid(tiny_llama, attention_layers=[1], mamba2_d_state=d_state)
        native.save_pretrained(final)
    out = export(final, "bamba", tmp_path / "bamba")
    bamba = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code: a stock class
    assert type(bamba) is BambaForCausalLM
    config = json.loads((out / "config.json").read_text())
    assert config["attn_layer_indices"] == [1] and config["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert config["mamba_d_state"] == native.config.mamba2_d_state
    assert not list(out.glob("*.py"))

    ids, mask = _batch()
    with torch.no_grad():
        expected, got = native(ids).logits, bamba(ids).logits
        # the same model computed by other code (transformers' Bamba scan): the same sums in another order
        bound = reordering_bound(native.config, torch.float32, expected.abs().max())
        assert (expected - got).abs().max() <= bound
        padded_expected = native(ids, attention_mask=mask).logits[1, 3:]
        padded_got = bamba(ids, attention_mask=mask).logits[1, 3:]
        assert (padded_expected - padded_got).abs().max() <= bound
        assert (padded_got - bamba(ids[1:, 3:]).logits[0]).abs().max() <= bound  # padding does not leak


@pytest.mark.slow
def test_bamba_export_generates_like_native(checkpoint, tmp_path):
    """Greedy `generate()` through both models' recurrent caches, alone and batched with left padding."""
    from transformers import AutoModelForCausalLM

    final, native = checkpoint
    bamba = AutoModelForCausalLM.from_pretrained(export(final, "bamba", tmp_path / "bamba")).eval()
    ids, mask = _batch()
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 3}
    for kwargs in ({"input_ids": ids[:1]}, {"input_ids": ids, "attention_mask": mask}):
        # the native picks clear every near tie by twice the bound the two computations may differ by
        assert torch.equal(clear_greedy(native, **kwargs, max_new_tokens=12, pad_token_id=3),
                           bamba.generate(**kwargs, **greedy))


def test_tiling_instead_of_repeat_interleave_is_caught(checkpoint, tmp_path, monkeypatch):
    """The export's own logits check catches a wrong kv-group expansion (and this test can fail)."""
    import distill.export as export_module

    def tile(rows, num_kv, repeats):
        return (
            rows.reshape(num_kv, -1, *rows.shape[1:])
            .repeat(repeats, *[1] * rows.dim())
            .reshape(-1, *rows.shape[1:])
        )

    monkeypatch.setattr(export_module, "_repeat_kv_rows", tile)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        export(checkpoint[0], "bamba", tmp_path / "bamba")
    assert not (tmp_path / "bamba").exists() and not list(tmp_path.glob(".bamba*"))  # no half-written folder


def test_native_export_folder(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, native = checkpoint
    out = export(final, "native", tmp_path / "native", max_shard_size="60KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hybrid.HybridForCausalLM"
    assert {"configuration_hybrid.py", "modeling_hybrid.py", "generation_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi</s>"
    )
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| 1 | end_to_end | 50,000 |" in card
    assert "| 12.5 | 14.2 |" in card and "| 0.77 |" in card  # the eval table

    export(final, "native", out)  # exporting again replaces the folder in one rename, leaving no temp folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native", "run"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, _ = _batch()
    with torch.no_grad():
        assert torch.equal(native(ids).logits, reloaded(ids).logits)  # same process, weights and kernels


def test_native_then_bamba_then_reload(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    final, native = checkpoint
    first = export(final, "native", tmp_path / "native")
    second = main([str(first), "--format", "bamba", "--out", str(tmp_path / "bamba")])
    assert second == 0
    bamba = AutoModelForCausalLM.from_pretrained(tmp_path / "bamba").eval()
    ids, _ = _batch()
    with torch.no_grad():
        expected = native(ids).logits
        assert (expected - bamba(ids).logits).abs().max() <= reordering_bound(native.config, torch.float32,
                                                                               expected.abs().max())


def test_wrong_eps_is_refused(checkpoint, tmp_path):
    final, _ = checkpoint
    config = json.loads((final / "config.json").read_text())
    config["mamba_norm_eps"] = 1e-6
    (final / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"eps \(1e-06\) differs from rms_norm_eps"):
        export(final, "bamba", tmp_path / "bamba")
    assert not (tmp_path / "bamba").exists()


def test_mamba1_student_is_refused(tmp_path, tiny_llama):
    model = make_hybrid(tiny_llama, mixer="mamba1", attention_layers=[1])
    model.save_pretrained(tmp_path / "ckpt")
    char_tokenizer().save_pretrained(tmp_path / "ckpt")
    with pytest.raises(UserError, match="Mamba-1 .* use --format native"):
        export(tmp_path / "ckpt", "bamba", tmp_path / "bamba")
    export(tmp_path / "ckpt", "native", tmp_path / "native")  # the native format takes it


def test_damaged_safetensors_gives_clear_error(checkpoint, tmp_path):
    final, _ = checkpoint
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="model.safetensors is damaged or truncated"):
        export(final, "native", tmp_path / "native")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing-dir", "--out", "x"], "does not exist"),
        (["{final}", "--format", "bamba", "--out", "{tmp}/run/eval"], "not a model folder"),
        (["{final}", "--format", "bamba", "--out", "{tmp}/run"], "would replace the checkpoint"),
    ],
)
def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys, args, message):
    from distill.cli import main as cli_main

    args = [arg.format(final=checkpoint[0], tmp=tmp_path) for arg in args]
    assert cli_main(["export", *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "Traceback" in line or "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def test_push_to_hub_network_error_is_clear(checkpoint, tmp_path, monkeypatch):
    """The real huggingface_hub upload path, against a port where nothing listens: one clear line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    with pytest.raises(UserError, match=r"could not upload to http://127.0.0.1:9 \(ConnectError") as caught:
        export(checkpoint[0], "native", tmp_path / "native", push_to_hub="someone/hybrid")
    assert "\n" not in str(caught.value)
    assert (tmp_path / "native" / "config.json").is_file()  # the export itself is complete


def test_push_to_hub_offline_mode_is_clear(checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="OfflineModeIsEnabled"):
        export(checkpoint[0], "native", tmp_path / "native", push_to_hub="someone/hybrid")


@pytest.mark.slow
def test_native_export_loads_without_our_package(checkpoint, tmp_path):
    """`trust_remote_code=True` in a fresh interpreter where `import distill` fails."""
    final, native = checkpoint
    out = export(final, "native", tmp_path / "native")
    ids, _ = _batch()
    logits = native(ids).logits.detach()
    # another process may use another thread count and so another order of sums: compare within that bound
    bound = reordering_bound(native.config, torch.float32, logits.abs().max())
    torch.save({"ids": ids, "logits": logits, "bound": bound}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.modules["distill"] = None  # any import of our package fails
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    assert (model(expected["ids"]).logits - expected["logits"]).abs().max() <= expected["bound"]
print(type(model).__module__)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transformers_modules" in result.stdout


@pytest.mark.slow
def test_lm_eval_same_numbers_on_stock_export(checkpoint, tmp_path):
    """lm-eval's stock `hf` model scores the Bamba export exactly like the native checkpoint."""
    from distill.eval.lm_eval_runner import run_lm_eval

    final, model = checkpoint
    native = export(final, "native", tmp_path / "native")
    bamba = export(final, "bamba", tmp_path / "bamba")
    tasks = ["sharegpt_ppl", "sharegpt_next_sentence"]
    results = [run_lm_eval(str(folder), tasks, limit=4, batch_size=2) for folder in (native, bamba)]
    # Each loglikelihood sums per-character log-probabilities (the character tokenizer), and the two exports'
    # differ by at most 2 logprob_error (each export's logits within reordering_bound of the exact ones, whose
    # size the weights bound). The perplexities and bits per byte are exp or linear in that sum per byte (at
    # least one character) or per word, so they move by that much, relative, times the characters per word for
    # word_perplexity (under 20 in this prose); the accuracies (and their stderr) are means of comparisons
    # that flip only on a near tie, so they are equal.
    scale = logit_scale(model)
    per_token = 2 * logprob_error(torch.full((model.config.vocab_size,), scale), reordering_bound(
        model.config, torch.float32, scale))
    for task in tasks:
        native_metrics, bamba_metrics = (r["results"][task] for r in results)
        numeric = {k: v for k, v in native_metrics.items() if isinstance(v, float)}
        assert numeric
        for key, value in numeric.items():
            if key.startswith(("word_perplexity", "byte_perplexity", "bits_per_byte")):
                per_unit = 20 if key.startswith("word_perplexity") else 1
                within(abs(bamba_metrics[key] - value), per_unit * per_token * abs(value), f"{task} {key}")
            else:
                assert bamba_metrics[key] == value, key


@pytest.mark.slow
def test_smollm2_hybrid_bamba_export_equals_native(smollm2, tmp_path):
    """On the real teacher's 50% hybrid: the same fp32 computation in Bamba's layout, its sums in another order."""
    from transformers import AutoModelForCausalLM

    teacher, tokenizer = smollm2
    native = make_hybrid(teacher, attention_fraction=0.5)
    native.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    out = export(tmp_path / "ckpt", "bamba", tmp_path / "bamba")
    bamba = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer.padding_side = "left"
    prompts = ["The capital of France is", "Write a haiku about the sea, please:"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, got = native(**batch).logits[real], bamba(**batch).logits[real]
    within((expected - got).abs().max().item(), reordering_bound(native.config, torch.float32, expected.abs().max().item()))
    greedy = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(native.generate(**batch, **greedy), bamba.generate(**batch, **greedy))
