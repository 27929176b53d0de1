"""The speed benchmark's machinery (not its timings): caches, state sizes, memory probe, table."""

import pytest
import torch
from conftest import REFERENCE_STUDENT

from distill.eval.speed import benchmark, build_cache, cache_bytes, markdown, measure_decode, peak_memory


def _hybrid(teacher, fraction):
    from distill.init import hybrid_from_teacher
    from distill.recipe import StudentConfig

    return hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, attention_fraction=fraction), seed=0).eval()


@pytest.mark.parametrize("fraction", [None, 0.5, 0.0])
@torch.no_grad()
def test_grown_cache_has_the_shapes_of_a_real_prefill(tiny_llama, fraction):
    model = tiny_llama if fraction is None else _hybrid(tiny_llama, fraction)
    real = model(input_ids=torch.randint(128, (2, 40)), use_cache=True).cache
    grown = build_cache(model, 2, 40)
    assert cache_bytes(grown) == cache_bytes(real)
    for real_layer, grown_layer in zip(real.layers, grown.layers):
        for name in ("keys", "values"):
            assert (
                getattr(real_layer, name, None) is None
                or getattr(real_layer, name).shape == getattr(grown_layer, name).shape
            )


@torch.no_grad()
def test_kv_grows_with_context_and_ssm_state_does_not(tiny_llama):
    cfg = tiny_llama.config
    for fraction, attention_layers in ((0.5, 2), (0.0, 0)):
        model = _hybrid(tiny_llama, fraction)
        short, long = cache_bytes(build_cache(model, 2, 32)), cache_bytes(build_cache(model, 2, 256))
        kv_per_token = (
            2 * attention_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
        )  # k+v, batch 2, fp32
        assert long["kv_cache_bytes"] - short["kv_cache_bytes"] == kv_per_token * (256 - 32)
        assert long["ssm_state_bytes"] == short["ssm_state_bytes"] > 0
    assert cache_bytes(build_cache(tiny_llama, 2, 32))["ssm_state_bytes"] == 0


def test_decode_continues_the_cache(tiny_llama):
    row = measure_decode(tiny_llama, batch=2, context=48, steps=3)
    assert row["decode_tok_s"] > 0 and row["decode_ms_per_step"] > 0
    assert (
        row["kv_cache_bytes"] == 2 * 4 * 2 * 2 * (48 + 0) * 16 * 4
    )  # k+v x layers x batch x kv heads x ctx x dim


def test_peak_memory_sees_reuse_of_a_heap_block_freed_earlier():
    """A large block freed to glibc's heap before the measurement (as earlier code in a long process leaves it)
    must not hide the next allocation: peak_memory trims the heap, so reusing it page-faults again."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 512 << 20)  # a 64 MiB block now comes from the heap, not mmap
    block = torch.ones(64 * 2**20 // 4)
    del block
    with peak_memory(torch.device("cpu")) as peak:
        block = torch.ones(32 * 2**20 // 4)
        del block
    assert 24 * 2**20 <= peak["bytes"] < 200 * 2**20


def test_peak_memory_sees_an_allocation_every_time():
    for _ in range(2):  # the second time the freed block must not be silently reused from the heap
        with peak_memory(torch.device("cpu")) as peak:
            block = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched
            del block
        assert 24 * 2**20 <= peak["bytes"] < 200 * 2**20


def test_benchmark_rows_and_ratios(tiny_llama):
    models = {"teacher": tiny_llama, "hybrid0": _hybrid(tiny_llama, 0.0)}
    rows = benchmark(
        models, [8, 32], [1, 2], steps=1, prefill_max_tokens=8, max_batch_tokens=32, log=lambda s: None
    )
    assert {(r["batch"], r["context"]) for r in rows} == {(1, 8), (1, 32), (2, 8)}  # 2 x 32 > 32 is skipped
    assert all(r["decode_speedup"] == 1.0 for r in rows if r["model"] == "teacher")
    assert all((r["prefill_tok_s"] is None) == (r["batch"] * r["context"] > 8) for r in rows)
    assert [r["kv_cache_bytes"] for r in rows if r["model"] == "hybrid0"] == [0, 0, 0]
    table = markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "hybrid0" in table


@torch.no_grad()
def test_a_wider_state_is_its_own_model_with_a_proportionally_larger_ssm_state(tiny_llama):
    from distill.eval.speed import hybrids_of

    models = hybrids_of(tiny_llama, [0.0], d_states=[32])  # head_dim 16
    assert list(models) == ["teacher", "hybrid0", "hybrid0-state32"]
    narrow, wide = (cache_bytes(build_cache(models[name], 2, 16)) for name in ("hybrid0", "hybrid0-state32"))
    # per Mamba layer: a conv state over [x | B | C] and an hd x n SSM state per head, fp32, batch 2
    cfg, layers = tiny_llama.config, tiny_llama.config.num_hidden_layers
    extra_ssm = layers * 2 * cfg.num_attention_heads * cfg.head_dim * (32 - 16) * 4
    extra_conv = layers * 2 * (cfg.num_key_value_heads + cfg.num_attention_heads) * (32 - 16) * 4 * 4  # d_conv 4
    assert wide["ssm_state_bytes"] - narrow["ssm_state_bytes"] == extra_ssm + extra_conv
