"""distill/run.py: the final checkpoint, and the whole pipeline on a tiny teacher through accelerate."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE_INIT, make_tiny_tokenizer, tiny_llama_config

from distill.pipeline import save_final
from distill.recipe import StudentConfig

ROOT = Path(__file__).parents[1]


def test_save_final_replaces_the_folder_atomically(tmp_path, tiny_llama, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from distill.init import hybrid_from_teacher

    student = hybrid_from_teacher(tiny_llama, StudentConfig(**REFERENCE_INIT, attention_layers=[0, 2]), seed=0).eval()
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    save_final(student, tiny_tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temp folder left behind
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        # the saved bits, loaded into the same model class in the same process: the same logits, bit for bit
        assert torch.equal(reloaded(ids).logits, student(ids).logits)
    assert (out / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny local teacher, chat data and a two-stage recipe (the real pipeline, minutes -> seconds)."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(vocab_size=258, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    LlamaForCausalLM(config).save_pretrained(root / "teacher")
    make_tiny_tokenizer().save_pretrained(root / "teacher")
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(120)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "recipe.yaml").write_text(
        "teacher: {source: teacher}\n"
        "student: {attention_layers: [0, 2], chunk_size: 16, norm_init: ones, conv_init: random}\n"
        "data: {source: chat.jsonl, max_length: 128, held_out_size: 4}\n"
        "stages:\n"
        "  - {name: layerwise, max_tokens: 1000, batch_size: 4, checkpoint_every_tokens: 500, activations: online}\n"
        "  - {name: end_to_end, max_tokens: 1000, batch_size: 4}\n"
        "eval: {max_sequences: 4}\n"
        "output_dir: out\n"
    )
    return root


def launch(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAMBA_DISTILL_CACHE": str(root / "cache")}
    done = subprocess.run(["accelerate", "launch", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_pipeline_writes_every_output_and_resumes(tiny_run):
    first = launch(tiny_run, "--config_file", str(ROOT / "recipes/accelerate/cpu.yaml"),
                   str(ROOT / "distill/run.py"), "recipe.yaml", "--set", "seed=3")
    out = tiny_run / "out"
    assert f"outputs in {out.resolve()}" in first.stdout
    assert "seed: 3" in (out / "recipe.yaml").read_text()
    log = (out / "run.log").read_text()
    assert "(NO, 1 process(es))" in log
    # a quiet console: bars, the run's lines, one line per stage; accelerate's checkpoint chatter in run.log only
    assert "Saving current state" in log and "Saving current state" not in first.stderr
    assert "[RANK 0]" not in first.stderr and "Removed shared tensor" not in first.stderr
    assert "Loading weights" not in first.stderr and "Writing model shards" not in first.stderr
    assert "Saving the dataset" not in first.stderr
    assert "stage 0 (layerwise): " in first.stderr and "stage 1 (end_to_end): " in first.stderr
    summaries = [json.loads((out / d / "summary.json").read_text()) for d in ("stage0-layerwise", "stage1-end_to_end")]
    assert all(s["finished"] and s["tokens"] >= 1000 for s in summaries)
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["student"]["perplexity"] > 0 and len(report["stages"]) == 2
    assert (out / "export" / "native" / "config.json").is_file()
    weights = (out / "final" / "model.safetensors").read_bytes()
    # final/ hard-links the last stage's weights (written once on disk), and is loadable on its own
    last = out / "stage1-end_to_end" / "final" / "model.safetensors"
    assert (out / "final" / "model.safetensors").samefile(last)
    assert {"tokenizer.json", "config.json", "modeling_hybrid.py"} <= {p.name for p in (out / "final").iterdir()}

    # a rerun reloads the finished stages instead of training them again
    launch(tiny_run, "--config_file", str(ROOT / "recipes/accelerate/cpu.yaml"),
           str(ROOT / "distill/run.py"), "recipe.yaml", "--set", "seed=3")
    assert [json.loads((out / d / "summary.json").read_text()) for d in ("stage0-layerwise", "stage1-end_to_end")] \
        == summaries
    assert (out / "final" / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_two_process_cpu_run_is_one_gloo_job(tiny_run):
    launch(tiny_run, "--multi_gpu", "--num_processes", "2", str(ROOT / "distill/run.py"), "recipe.yaml",
           "--set", "output_dir=out2")
    out = tiny_run / "out2"
    assert "(MULTI_CPU, 2 process(es))" in (out / "run.log").read_text()
    two = json.loads((out / "stage0-layerwise" / "summary.json").read_text())
    # one process can feed at most batch_size * max_length = 512 tokens a step; two processes feed more
    assert two["finished"] and two["tokens"] / two["steps"] > 4 * 128
    assert (out / "final" / "config.json").is_file()

