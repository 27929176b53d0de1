"""Initialisation from the teacher: layer selection, exact weight mapping, seeds, conv and norm options."""

import math

import pytest
import torch
from conftest import REFERENCE_INIT, REFERENCE_STUDENT, reordering_bound, tiny_llama_config
from tolerances import eps, summed, within
from transformers import LlamaForCausalLM

from distill.init import hybrid_config_from_teacher, hybrid_from_teacher, select_attention_layers
from distill.modeling_hybrid import HybridForCausalLM
from distill.recipe import RecipeError, StudentConfig

# Drawn from the seed (besides in_proj's z and dt rows); Mamba-1's A (S4D-real) and both D are deterministic.
RANDOM = {"mamba2": ("A_log", "dt_bias", "conv1d"), "mamba1": ("dt_proj", "conv1d")}


def test_half_attention_is_every_odd_layer():
    assert select_attention_layers(30, attention_fraction=0.5) == list(range(1, 30, 2))
    assert select_attention_layers(4, attention_fraction=0.5) == [1, 3]


def test_fractions_are_evenly_spaced_and_end_on_the_last_layer():
    assert select_attention_layers(8, attention_fraction=0.25) == [3, 7]
    assert select_attention_layers(12, attention_fraction=1 / 3) == [2, 5, 8, 11]
    assert select_attention_layers(6, attention_fraction=1.0) == list(range(6))
    assert select_attention_layers(6, attention_fraction=0.0) == []
    for n in range(1, 33):
        for k in range(n + 1):
            layers = select_attention_layers(n, attention_fraction=k / n)
            assert len(layers) == len(set(layers)) == k and all(0 <= i < n for i in layers)


def test_explicit_layers_and_mistakes():
    assert select_attention_layers(6, attention_layers=[4, 0]) == [0, 4]
    with pytest.raises(RecipeError, match="out of range"):
        select_attention_layers(6, attention_layers=[6])
    with pytest.raises(RecipeError, match="duplicates"):
        select_attention_layers(6, attention_layers=[1, 1])
    with pytest.raises(RecipeError, match="keeps 0 of 30"):
        select_attention_layers(30, attention_fraction=0.01)


def test_config_from_teacher():
    config = hybrid_config_from_teacher(tiny_llama_config(), StudentConfig(**REFERENCE_INIT, mixer="mamba1", attention_layers=[2]))
    assert config.mixer_types == ["mamba1", "mamba1", "attention", "mamba1"]
    assert config.mamba1_d_state == 16 and config.mamba1_dt_rank == 4  # head_dim, ceil(64 / 16)
    assert config._attn_implementation == "sdpa"
    narrow = hybrid_config_from_teacher(tiny_llama_config(), StudentConfig(**REFERENCE_STUDENT, mixer="mamba1", mamba1_d_state=8))
    assert narrow.mamba1_d_state == 8  # any divisor of the kv width (MambaInLlama uses 16)
    with pytest.raises(RecipeError, match="must divide the teacher's kv width"):
        hybrid_config_from_teacher(tiny_llama_config(), StudentConfig(**REFERENCE_STUDENT, mixer="mamba1", mamba1_d_state=12))
    assert hybrid_config_from_teacher(tiny_llama_config(attention_bias=True), StudentConfig(**REFERENCE_STUDENT)).mamba_proj_bias
    assert config.mamba2_d_state == 16  # unset: head_dim
    with pytest.raises(RecipeError, match="mamba2_d_state = 8 is below the teacher's head_dim = 16"):
        hybrid_config_from_teacher(tiny_llama_config(), StudentConfig(**REFERENCE_STUDENT, mamba2_d_state=8))


def test_a_wider_state_with_qwen3_bc_norms_is_refused_in_one_line():
    from transformers import Qwen3Config

    qwen3 = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(RecipeError, match="mamba2_d_state = 32 needs student.bc_norm: false with a Qwen3 teacher"):
        hybrid_config_from_teacher(qwen3, StudentConfig(**REFERENCE_STUDENT, mamba2_d_state=32))
    unnormed = StudentConfig(**REFERENCE_STUDENT, mamba2_d_state=32, bc_norm=False)
    assert hybrid_config_from_teacher(qwen3, unnormed).mamba2_d_state == 32


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_attention_weights_land_in_the_mixer_exactly(tiny_llama, mixer):
    student = hybrid_from_teacher(tiny_llama, StudentConfig(**REFERENCE_INIT, mixer=mixer, attention_layers=[1]))
    teacher = dict(tiny_llama.state_dict())
    for i, layer in enumerate(student.model.layers):
        for part in ("input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert torch.equal(layer.get_submodule(part).weight, teacher[f"model.layers.{i}.{part}.weight"])
        attn = tiny_llama.model.layers[i].self_attn
        if i == 1:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert torch.equal(getattr(layer.self_attn, proj).weight, getattr(attn, proj).weight)
            continue
        rows = layer.mamba.in_proj.weight
        # [z (64) | x (32) | B (32) | C (64) | dt (4: nh for Mamba-2, dt_rank for Mamba-1)]
        assert torch.equal(rows[64:96], attn.v_proj.weight)
        assert torch.equal(rows[96:128], attn.k_proj.weight)
        assert torch.equal(rows[128:192], attn.q_proj.weight)
        assert rows.shape[0] == 196
        assert torch.equal(layer.mamba.out_proj.weight, attn.o_proj.weight)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.state_dict()[name], teacher[name])


def _head_dim_rows(nh: int, nkv: int, hd: int, n: int) -> list[int]:
    """The in_proj rows of a Mamba-2 mixer with state n that a state of hd keeps: z, x, the first hd of each
    group's n rows of B (nkv groups) and of C (nh heads), dt."""
    b, c, dt = nh * hd + nkv * hd, nh * hd + nkv * hd + nkv * n, nh * hd + nkv * hd + nkv * n + nh * n
    return (list(range(b)) + [b + g * n + i for g in range(nkv) for i in range(hd)]
            + [c + h * n + i for h in range(nh) for i in range(hd)] + list(range(dt, dt + nh)))


@pytest.mark.parametrize("conv_init", ["random", "identity"])
def test_a_wider_mamba2_state_starts_where_head_dim_does_and_learns(tiny_llama, conv_init):
    """mamba2_d_state = 2 x head_dim: the student computes what the same weights with the extra state channels
    cut out compute (C's extra rows and their conv bias are zero, so those channels add exact zeros), and a
    gradient reaches C's extra rows (B's are random, so the extra state is not stuck at zero)."""
    cfg = StudentConfig(**{**REFERENCE_STUDENT, "conv_init": conv_init, "mamba2_d_state": 32})
    wide = hybrid_from_teacher(tiny_llama, cfg)
    narrow_cfg = hybrid_config_from_teacher(tiny_llama.config, cfg.model_copy(update={"mamba2_d_state": None}))
    assert narrow_cfg.mamba2_d_state == 16 and wide.config.mamba2_d_state == 32
    rows = _head_dim_rows(4, 2, 16, 32)
    channels = [r - 64 for r in rows[64:-4]]  # the conv runs over [x | B | C]
    state = {}
    for name, tensor in wide.state_dict().items():
        if name.endswith("mamba.in_proj.weight"):
            tensor = tensor[rows]
        elif name.endswith(("mamba.conv1d.weight", "mamba.conv1d.bias")):
            tensor = tensor[channels]
        state[name] = tensor
    narrow = HybridForCausalLM(narrow_cfg)
    narrow.load_state_dict(state, strict=True)
    attn, mixer = tiny_llama.model.layers[0].self_attn, wide.model.layers[0].mamba
    B, C = mixer.in_proj.weight[96:160].view(2, 32, 64), mixer.in_proj.weight[160:288].view(4, 32, 64)
    assert torch.equal(B[:, :16].reshape(32, 64), attn.k_proj.weight)
    assert torch.equal(C[:, :16].reshape(64, 64), attn.q_proj.weight)
    assert not C[:, 16:].any() and B[:, 16:].abs().min() > 0

    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(3))
    logits = wide(ids).logits
    with torch.no_grad():
        expected = narrow(ids).logits
    # the same sums, the wide one with exact zeros added: only the order of the scan's contractions differs
    assert (logits - expected).abs().max() <= reordering_bound(wide.config, torch.float32, expected.abs().max())
    logits.pow(2).mean().backward()
    assert mixer.in_proj.weight.grad[160:288].view(4, 32, 64)[:, 16:].abs().sum() > 0


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_seed_changes_fresh_parameters_only(tiny_llama, mixer):
    cfg = StudentConfig(**REFERENCE_STUDENT, mixer=mixer)
    rng = torch.get_rng_state()
    a, a2, b = (hybrid_from_teacher(tiny_llama, cfg, seed=s).state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng), "hybrid_from_teacher must not consume the global RNG"
    for name in a:
        assert torch.equal(a[name], a2[name]), name
        if ".mamba." in name and any(key in name for key in RANDOM[mixer]):
            assert not torch.equal(a[name], b[name]), name
        elif "in_proj" not in name:
            assert torch.equal(a[name], b[name]), name
    layer = "model.layers.0.mamba.in_proj.weight"
    assert torch.equal(a[layer][64:192], b[layer][64:192])  # copied x, B, C rows
    assert not torch.equal(a[layer][:64], b[layer][:64])  # fresh z rows


def test_random_init_keeps_nothing_of_the_attention(tiny_llama):
    student = hybrid_from_teacher(tiny_llama, StudentConfig(**REFERENCE_STUDENT, init="random"))
    rows = student.model.layers[0].mamba.in_proj.weight
    assert not torch.equal(rows[64:96], tiny_llama.model.layers[0].self_attn.v_proj.weight)
    assert not torch.equal(student.model.layers[0].mamba.out_proj.weight, tiny_llama.model.layers[0].self_attn.o_proj.weight)
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, tiny_llama.model.layers[0].mlp.up_proj.weight)


def test_identity_conv_passes_the_current_token(tiny_llama):
    student = hybrid_from_teacher(tiny_llama, StudentConfig(**{**REFERENCE_STUDENT, "conv_init": "identity"}))
    conv = student.model.layers[0].mamba.conv1d
    x = torch.randn(1, conv.in_channels, 5)
    out = torch.nn.functional.conv1d(x, conv.weight, conv.bias, padding=3, groups=conv.in_channels)[..., :5]
    assert torch.equal(out, x)  # a delta kernel: each output is x * 1.0 plus zeros, exact in floating point


def test_rms_ratio_matches_the_attention_output_scale(tiny_llama):
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(RecipeError, match="calibration_input_ids"):
        hybrid_from_teacher(tiny_llama, StudentConfig(attention_layers="uniform"))
    student = hybrid_from_teacher(tiny_llama, StudentConfig(attention_layers="uniform"), calibration_input_ids=ids)
    captured = {}
    for i in (0, 2):
        tiny_llama.model.layers[i].self_attn.register_forward_pre_hook(
            lambda m, a, k, i=i: captured.__setitem__(("in", i), k["hidden_states"]), with_kwargs=True
        )
        tiny_llama.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: captured.__setitem__(("o", i), a[0])
        )
    with torch.no_grad():
        tiny_llama(ids, use_cache=False)
        for i in (0, 2):
            mixer = student.model.layers[i].mamba
            weight = mixer.norm.weight
            assert torch.all(weight == weight[0]) and weight[0] != 1.0
            handle = mixer.out_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("mix", a[0]))
            mixer(captured["in", i])
            handle.remove()
            ratio = captured["mix"].pow(2).mean().sqrt() / captured["o", i].pow(2).mean().sqrt()
            # the norm weight is this very ratio, computed in fp32 over the same rows: two root-mean-squares,
            # each a sum of that many positive squares (relative error summed(n), halved by the root), on both
            # sides, and a division
            n = max(captured["mix"].numel(), captured["o", i].numel())
            within(abs(ratio.item() - 1), 2 * summed(n) + 2 * eps())


@pytest.mark.slow
def test_smollm2_students_have_the_parameter_counts_of_the_documented_shapes(smollm2):
    """Each replaced layer trades the attention's q, k, v, o for a mixer of the shapes docs/design.md lists."""
    teacher, _ = smollm2
    assert isinstance(teacher, LlamaForCausalLM)
    c = teacher.config
    hidden, heads, hd = c.hidden_size, c.num_attention_heads, c.head_dim
    d_inner, d_xb, w = heads * hd, c.num_key_value_heads * hd, 4
    attention = 2 * hidden * d_inner + 2 * hidden * d_xb  # q, o and k, v (no biases)
    rank, n1 = math.ceil(hidden / 16), hd
    mixers = {
        "mamba2": (2 * d_inner + 2 * d_xb + heads) * hidden + (2 * d_xb + d_inner) * (w + 1) + 3 * heads + d_inner
        + hidden * d_inner,
        "mamba1": (2 * d_inner + 2 * d_xb + rank) * hidden + d_inner * (w + 1) + d_inner * (rank + 1)
        + d_inner * n1 + d_inner + hidden * d_inner,
    }
    for mixer, fraction in (("mamba2", 0.5), ("mamba1", 0.5), ("mamba2", 0.0)):
        student = hybrid_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT, mixer=mixer, attention_fraction=fraction))
        replaced = c.num_hidden_layers - round(fraction * c.num_hidden_layers)
        assert student.config.num_hidden_layers == 30
        assert student.num_parameters() - teacher.num_parameters() == replaced * (mixers[mixer] - attention), mixer
