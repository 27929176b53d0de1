"""The layerwise stage's activation cache on disk (`cache_storage: disk`) against the one in memory, on a tiny
hybrid built from a tiny Llama teacher with random packed rows."""

import json

import numpy as np
import pytest
import torch
from test_stages import run, tiny_hybrid
from test_trainer import make_context, make_recipe

torch.set_num_threads(1)  # tiny matmuls: more threads only contend on the shared 2-core box


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def cached_stage(**overrides) -> dict:
    return {"name": "layerwise", "max_tokens": 1200, "lr": 1e-2, "activations": "cached", "cache_epochs": 3,
            "held_out_rows": 0, **overrides}


def weights(student) -> dict:
    return {name: value.clone() for name, value in student.state_dict().items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_disk_cache_trains_exactly_like_the_memory_cache(tmp_path, tiny_llama, precision):
    from distill.recipe import recipe_from_dict
    from distill.stages import run_stage

    results = {}
    for storage in ("memory", "disk"):
        stage = cached_stage(cache_storage=storage)
        recipe = recipe_from_dict({"output_dir": str(tmp_path / storage), "precision": precision,
                                   "stages": [stage]})
        student = run_stage(make_context(recipe, tiny_llama), 0, recipe.stages[0], tiny_hybrid(tiny_llama))
        summary = json.loads((tmp_path / storage / "stage0-layerwise" / "summary.json").read_text())
        results[storage] = weights(student), summary
    # both stores keep the same bf16 bits and hand back the same tensors, so training is bit-identical
    (memory, memory_summary), (disk, disk_summary) = results["memory"], results["disk"]
    assert all(torch.equal(memory[name], disk[name]) for name in memory)
    assert memory_summary["final_loss"] == disk_summary["final_loss"]
    # trained: the file is gone
    assert not any((tmp_path / "disk" / "stage0-layerwise" / "activations").glob("*/rank0"))


def test_disk_store_returns_what_the_memory_store_returns(tmp_path, tiny_llama):
    from distill.alignment import ActivationCache, DiskStore, MemoryStore, capture_teacher

    ctx = make_context(make_recipe(tmp_path, {"name": "layerwise", "max_tokens": 10}), tiny_llama)
    capture = capture_teacher(ctx.accelerator, tiny_llama, [0, 2], "mixer_output")
    slots = [(part, i) for part in ("inputs", "outputs") for i in (0, 2)]
    memory = ActivationCache(capture, MemoryStore(len(ctx.train), row_bytes=1, max_gb=1))
    disk = ActivationCache(capture, DiskStore(tmp_path / "cache", len(ctx.train), slots, 32, 64, key={}))
    rows = ctx.train.with_format("torch")
    for picked in ([0, 1, 2], [2, 5, 0, 5]):  # the second batch reads rows 0 and 2 back and holds row 5 twice
        batch = {**rows[picked], "row": torch.tensor(picked)}
        a, b = memory(batch), disk(batch)
        for part, layer in slots:
            assert a[part][layer].dtype == b[part][layer].dtype == torch.float32
            assert torch.equal(a[part][layer], b[part][layer]), (part, layer)
    assert sorted(memory.store.rows) == sorted(np.flatnonzero(disk.store.filled)) == [0, 1, 2, 5]


def test_a_killed_disk_cache_resumes_with_the_rows_it_had_stored(tmp_path, tiny_llama, monkeypatch):
    """A stage stopped partway (here by an exception in the teacher capture, standing for a kill) and rerun
    captures only the rows it had not stored, and ends with the weights of a run that was never stopped."""
    from distill import alignment

    stage = cached_stage(cache_storage="disk", checkpoint_every_tokens=200)
    straight, _, _ = run(tmp_path / "straight", tiny_llama, tiny_hybrid(tiny_llama), stage)
    expected = weights(straight)

    captured, original = [], alignment.capture_teacher

    def stopping_after(calls):
        def capture_teacher(*args):
            step = original(*args)

            def counted(batch):
                if calls is not None and len(captured) >= calls:
                    raise KeyboardInterrupt
                captured.append(batch["row"].tolist())
                return step(batch)

            return counted

        return capture_teacher

    monkeypatch.setattr(alignment, "capture_teacher", stopping_after(3))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", tiny_llama, tiny_hybrid(tiny_llama), stage)
    stored = sorted(row for rows in captured for row in rows)
    folder = next((tmp_path / "killed" / "stage0-layerwise" / "activations").glob("*/rank0"))
    shape = json.loads((folder / "meta.json").read_text())["shape"]
    filled = np.unpackbits(np.load(folder / "filled.npy"), count=shape[0]).astype(bool)
    assert sorted(np.flatnonzero(filled)) == stored
    # a kill between writing a row's bytes and recording it leaves bytes the record does not vouch for
    data = np.memmap(folder / "activations.bin", dtype=np.int16, mode="r+", shape=tuple(shape))
    data[~filled] = np.int16(0x7F80)  # bf16 inf
    data.flush()

    captured.clear()
    monkeypatch.setattr(alignment, "capture_teacher", stopping_after(None))
    resumed, _, _ = run(tmp_path / "killed", tiny_llama, tiny_hybrid(tiny_llama), stage)
    again = sorted(row for rows in captured for row in rows)
    assert not set(again) & set(stored) and again, (again, stored)
    assert all(torch.equal(expected[name], value) for name, value in weights(resumed).items())


@pytest.mark.parametrize("failure", ["disk_usage", "fallocate"])
def test_a_full_disk_is_a_one_line_error(tmp_path, tiny_llama, monkeypatch, failure):
    import errno
    import os
    import shutil
    from collections import namedtuple

    from distill.errors import TrainingError

    if failure == "disk_usage":
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6, 0))
    else:
        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)
    refusal = r"^cache_storage: disk cannot keep .* GiB .*cache_storage: memory$"
    with pytest.raises(TrainingError, match=refusal):
        run(tmp_path, tiny_llama, tiny_hybrid(tiny_llama), cached_stage(cache_storage="disk"))


def test_a_bad_cache_dir_is_a_one_line_error_and_the_memory_limit_is_for_memory_only(tmp_path, tiny_llama):
    from distill.errors import TrainingError

    (tmp_path / "a-file").write_text("")
    stage = cached_stage(cache_storage="disk", cache_dir=str(tmp_path / "a-file" / "cache"),
                         cache_max_gb=1e-6)
    refusal = r"^cache_storage: disk cannot keep [^\n]* set cache_dir to [^\n]*$"
    with pytest.raises(TrainingError, match=refusal):
        run(tmp_path / "bad", tiny_llama, tiny_hybrid(tiny_llama), stage)
    # the same tiny cache_max_gb refuses the memory store but not the disk one
    with pytest.raises(TrainingError, match=r"^activations: cached needs .* cache_storage: disk"):
        run(tmp_path / "memory", tiny_llama, tiny_hybrid(tiny_llama), {**stage, "cache_storage": "memory"})
    _, summary, _ = run(tmp_path / "disk", tiny_llama, tiny_hybrid(tiny_llama), {**stage, "cache_dir": None})
    assert summary["tokens"] >= 1200
