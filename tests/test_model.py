"""The hybrid model: Mamba mixers against float64 naive loops, packing, padding, dtypes, save/load, remote code."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE_STUDENT, reordering_bound, tiny_llama_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from tolerances import half_precision_bound, within
from transformers import AutoModelForCausalLM

import distill.modeling_hybrid  # noqa: F401  (registers the Auto classes)
from distill.configuration_hybrid import HybridConfig
from distill.init import hybrid_from_teacher
from distill.modeling_hybrid import HybridForCausalLM
from distill.recipe import StudentConfig

MIXED = ["attention", "mamba2", "mamba1", "mamba2"]


def hybrid_config(mixer_types=MIXED, **overrides):
    fields = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "chunk_size": 8, "attn_implementation": "sdpa",
    }
    fields.update(overrides)
    return HybridConfig(num_hidden_layers=len(mixer_types), mixer_types=list(mixer_types), **fields)


def random_model(mixer_types=MIXED, seed=0, **overrides):
    """A hybrid whose D and gated-norm weights are random too, so every parameter shows in the output."""
    torch.manual_seed(seed)
    model = HybridForCausalLM(hybrid_config(mixer_types, **overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.mixer_type != "attention":
                layer.mamba.D.uniform_(0.5, 1.5)
                if layer.mixer_type == "mamba2":
                    layer.mamba.norm.weight.uniform_(0.5, 1.5)
    return model


# ----------------------------------------------------------------------------- naive float64 references


def naive_conv_silu(x, weight, bias):
    """Depthwise causal conv, one output position at a time. x (b, l, c), weight (c, w)."""
    width = weight.shape[1]
    out = torch.empty_like(x)
    for t in range(x.shape[1]):
        acc = bias.expand(x.shape[0], -1).clone()
        for k in range(width):
            s = t - (width - 1) + k
            if s >= 0:
                acc = acc + weight[:, k] * x[:, s]
        out[:, t] = F.silu(acc)
    return out


def naive_mamba2(mixer, u):
    """The Mamba-2 mixer written as its per-timestep recurrence, head by head (module docstring equations)."""
    nh, nkv, hd, n = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim, mixer.d_state
    b, length, _ = u.shape
    proj = u @ mixer.in_proj.weight.T
    z, xbc, dt = proj.split([nh * hd, nkv * hd + nkv * n + nh * n, nh], dim=-1)
    xbc = naive_conv_silu(xbc, mixer.conv1d.weight[:, 0], mixer.conv1d.bias)
    x, B, C = xbc.split([nkv * hd, nkv * n, nh * n], dim=-1)
    y = torch.zeros(b, length, nh, hd, dtype=u.dtype)
    state = torch.zeros(b, nh, hd, n, dtype=u.dtype)
    for t in range(length):
        for h in range(nh):
            g = h // (nh // nkv)
            xh, Bh, Ch = x[:, t, g * hd : (g + 1) * hd], B[:, t, g * n : (g + 1) * n], C[:, t, h * n : (h + 1) * n]
            step = F.softplus(dt[:, t, h].float() + mixer.dt_bias[h].float()).to(u.dtype)  # fp32, as the mixer
            decay = torch.exp(step * -torch.exp(mixer.A_log[h].float()).to(u.dtype))
            state[:, h] = decay[:, None, None] * state[:, h] + step[:, None, None] * xh[:, :, None] * Bh[:, None, :]
            y[:, t, h] = torch.einsum("bpn,bn->bp", state[:, h], Ch) + mixer.D[h] * xh
    gated = y * F.silu(z).view(b, length, nh, hd)
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
    return (normed.reshape(b, length, nh * hd) * mixer.norm.weight) @ mixer.out_proj.weight.T


def naive_mamba1(mixer, u):
    """The Mamba-1 mixer as its per-timestep recurrence over channels (MambaInLlama's equations)."""
    d_inner, d_xb, n = mixer.d_inner, mixer.d_xb, mixer.d_state
    b, length, _ = u.shape
    widths = [d_inner, d_xb, d_xb, d_inner, mixer.dt_rank]
    z, x, B, C, dt_low = (u @ mixer.in_proj.weight.T).split(widths, dim=-1)
    channel = torch.arange(d_inner)
    group = channel // n  # the B/C group channel c reads; x and B are stored at kv width
    kv_group = group // (d_inner // d_xb)
    x = x[..., kv_group * n + channel % n]
    x = naive_conv_silu(x, mixer.conv1d.weight[:, 0], mixer.conv1d.bias)
    # dt is computed from u (not the conv output); dt and A are rounded to fp32 whatever the dtype, as in the mixer
    dt = F.softplus((dt_low @ mixer.dt_proj.weight.T + mixer.dt_proj.bias).float()).to(u.dtype)
    A = -torch.exp(mixer.A_log.float()).to(u.dtype)
    B = B.view(b, length, d_xb // n, n)[:, :, kv_group]  # (b, l, d_inner, n)
    C = C.view(b, length, d_inner // n, n)[:, :, group]
    state = torch.zeros(b, d_inner, n, dtype=u.dtype)
    y = torch.zeros(b, length, d_inner, dtype=u.dtype)
    for t in range(length):
        state = torch.exp(dt[:, t, :, None] * A) * state + dt[:, t, :, None] * B[:, t] * x[:, t, :, None]
        y[:, t] = (state * C[:, t]).sum(-1) + mixer.D * x[:, t]
    return (y * F.silu(z)) @ mixer.out_proj.weight.T


NAIVE = {"mamba2": naive_mamba2, "mamba1": naive_mamba1}


def loop_bound(mixer_type: str, mixer, u: torch.Tensor, want: torch.Tensor) -> float:
    """How far a correct mixer (float64 weights and input) may be from its float64 loop.

    Both compute dt and A in fp32, whatever the dtype. The fast paths then sum dt * A in fp32: over a chunk for
    Mamba-2's chunked scan, so each log-decay may be off by chunk * eps32 relative (one rounding for Mamba-1).
    The bound is twice what scaling every log-decay by that much moves the loop's exact output (the conditioning
    of the recurrence, measured rather than guessed), plus float64 rounding over L steps of d_state-long sums.
    """
    steps = mixer.chunk_size if mixer_type == "mamba2" else 1
    d_state = mixer.d_state
    eps = steps * torch.finfo(torch.float32).eps
    with torch.no_grad():
        mixer.A_log.add_(math.log1p(eps))
        moved = (NAIVE[mixer_type](mixer, u) - want).abs().max().item()
        mixer.A_log.sub_(math.log1p(eps))
    return 2 * moved + 4 * u.shape[1] * d_state * torch.finfo(torch.float64).eps * want.abs().max().item()


@pytest.mark.parametrize("mixer_type", ["mamba2", "mamba1"])
@pytest.mark.parametrize(
    "shape",
    [
        {},  # 4 heads on 2 kv-heads of 16, conv 4
        {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8, "d_conv": 2},  # SmolLM2's 3:1 GQA
        {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "d_conv": 3, "mamba1_d_state": 4},
        # Mamba-1: a d_state group spanning two heads; Mamba-2: a state 1.5 heads wide
        {"mamba1_d_state": 32, "mamba1_dt_rank": 3, "mamba2_d_state": 24},
    ],
    ids=["gqa2", "gqa3", "mha", "wide-state"],
)
def test_mixer_matches_naive_float64_loop(mixer_type, shape):
    model = random_model([mixer_type], **shape).double()
    mixer = model.model.layers[0].mamba
    u = torch.randn(2, 19, 64, dtype=torch.float64)  # 19: more than two chunks of 8, not a multiple
    with torch.no_grad():
        got, want = mixer(u), NAIVE[mixer_type](mixer, u)
    assert (got - want).abs().max() <= loop_bound(mixer_type, mixer, u, want)


def test_mamba1_d_state_must_divide_the_kv_width():
    with pytest.raises(ValueError, match="mamba1_d_state = 12 must divide"):
        HybridForCausalLM(hybrid_config(["mamba1"], mamba1_d_state=12))


@pytest.mark.parametrize("mixer_type", ["mamba2", "mamba1"])
def test_packed_documents_reset_the_state(mixer_type):
    """A row packing three documents (position_ids restart) equals the documents run one by one."""
    mixer = random_model([mixer_type]).double().model.layers[0].mamba
    lengths = [5, 9, 3]
    u = torch.randn(1, sum(lengths), 64, dtype=torch.float64)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = mixer(u, position_ids=position_ids)
        alone = torch.cat([NAIVE[mixer_type](mixer, part) for part in u.split(lengths, dim=1)], dim=1)
    assert (packed - alone).abs().max() <= loop_bound(mixer_type, mixer, u, alone)  # a leaked state would be O(|alone|)


def test_packed_rows_match_documents_through_the_whole_model():
    """Attention (transformers' packed mask, which needs use_cache=False) and both mixers see each document alone."""
    model = random_model()
    lengths = [6, 10]
    ids = torch.randint(0, 128, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    # the same sums in another order (a block-diagonal mask, scans restarted); a leak across documents is O(1)
    assert (packed - alone).abs().max() <= reordering_bound(model.config, torch.float32, alone.abs().max())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_leak(side):
    model = random_model()
    ids = torch.randint(0, 128, (1, 9))
    pad = torch.zeros(1, 4, dtype=torch.long)
    padded = torch.cat([pad, ids] if side == "left" else [ids, pad], dim=1)
    mask = torch.cat([pad, torch.ones_like(ids)] if side == "left" else [torch.ones_like(ids), pad], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()[0]
    with torch.no_grad():
        want = model(ids).logits[0]
        got = model(padded, attention_mask=mask, position_ids=position_ids).logits[0, real]
        # Garbage in the padded slots must not change anything either.
        garbage = padded.masked_fill(~mask.bool(), 77)
        got2 = model(garbage, attention_mask=mask, position_ids=position_ids).logits[0, real]
    bound = reordering_bound(model.config, torch.float32, want.abs().max())  # padding only changes sum orders
    assert (got - want).abs().max() <= bound and (got2 - want).abs().max() <= bound


def test_zero_mamba_hybrid_equals_teacher(tiny_llama):
    student = hybrid_from_teacher(tiny_llama, StudentConfig(**REFERENCE_STUDENT, attention_fraction=1.0)).eval()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            want = tiny_llama(ids, **kwargs).logits
            diff = (student(ids, **kwargs).logits - want).abs().max().item()
            # the same transformers modules on the same weights (only the model class around them differs):
            # equal up to reordered fp32 sums
            assert diff <= reordering_bound(tiny_llama.config, torch.float32, want.abs().max()), kwargs


def test_block_and_mixer_run_alone_on_teacher_inputs():
    """The layerwise trainer calls a block or `layers[i].mamba` directly, without a cache."""
    model = random_model()
    hidden = torch.randn(2, 7, 64)
    position_ids = torch.arange(7)[None]
    layer = model.model.layers[1]
    cos_sin = model.model.rotary_emb(hidden, position_ids)
    with torch.no_grad():
        block = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)
        mixer = layer.mamba(layer.input_layernorm(hidden), attention_mask=torch.ones(2, 7, dtype=torch.long))
        whole = model.model.layers[1].mamba(layer.input_layernorm(hidden))
    assert block.shape == hidden.shape
    assert torch.equal(mixer, whole)  # a padding mask of ones multiplies by 1: the same bits
    with pytest.raises(ValueError, match="2D"):
        layer.mamba(hidden, attention_mask=torch.zeros(2, 1, 7, 7))


def test_backward_reaches_every_mixer_parameter():
    model = random_model().train()
    ids = torch.randint(0, 128, (2, 11))
    packed = torch.cat([torch.arange(4), torch.arange(7)])[None].expand(2, -1)  # through the per-document path
    model(ids, position_ids=packed, labels=ids, use_cache=False).loss.backward()
    for name, param in model.named_parameters():
        if ".mamba." in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_run_and_stay_close(dtype):
    model = random_model()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
        half = random_model().to(dtype)
        got = half(ids).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    # each stored tensor and weight rounded once to the dtype (tolerances.half_precision_bound: ~22 eps of the
    # logits' scale); a wrong dtype path (an fp16 overflow, an unconverted state) moves them O(1)
    bound = half_precision_bound(model.config, dtype, want.abs().max().item())
    within((got.float() - want).abs().max().item(), bound, str(dtype))


def test_save_load_round_trip_is_bit_exact_and_keeps_A_in_fp32(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "modeling_hybrid.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HybridForCausalLM and loaded.config.mixer_types == MIXED
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        # same process, same weights bit for bit, same kernels and thread count: a deterministic repeat
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[1].mamba.A_log.dtype == torch.float32
    assert bf16.model.layers[1].mamba.in_proj.weight.dtype == torch.bfloat16


REMOTE = textwrap.dedent(
    """
    import sys

    class NoDistill:  # mamba-distill is installed here; make it invisible, as on a machine without it
        def find_spec(self, name, path=None, target=None):
            if name == "distill" or name.startswith("distill."):
                raise ModuleNotFoundError(name)

    sys.meta_path.insert(0, NoDistill())
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    want = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(want["ids"]).logits
        tokens = model.generate(want["ids"], max_new_tokens=4, do_sample=False)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert not any(name.split(".")[0] == "distill" for name in sys.modules)
    # another process may use another thread count, so its sums may be ordered differently (not bit-equal)
    assert (logits - want["logits"]).abs().max() <= want["bound"], (logits - want["logits"]).abs().max()
    assert torch.equal(tokens, want["tokens"])  # the caller checked that no greedy pick is within the bound
    print("remote ok")
    """
)


@pytest.mark.slow
def test_remote_code_loads_without_the_package(tmp_path):
    model = random_model()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        want = {"ids": ids, "logits": model(ids).logits, "tokens": out.sequences}
    want["bound"] = reordering_bound(model.config, torch.float32, want["logits"].abs().max())
    top2 = torch.stack(out.logits).topk(2, dim=-1).values
    # greedy tokens can only be compared across processes where the top two logits are further apart than that
    assert (top2[..., 0] - top2[..., 1]).min() > 2 * want["bound"]
    torch.save(want, tmp_path / "want.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "want.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout


def test_config_rejects_bad_layers():
    with pytest.raises(StrictDataclassClassValidationError, match="mixer_types contains"):
        hybrid_config(["attention", "mamba3"])
    with pytest.raises(StrictDataclassClassValidationError, match="num_hidden_layers"):
        HybridConfig(num_hidden_layers=3, mixer_types=["mamba2"])
    config = hybrid_config()
    assert config.layer_types == ["full_attention", "linear_attention", "linear_attention", "linear_attention"]
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_hybrid.HybridForCausalLM"


def test_llama_fields_follow_the_teacher():
    teacher = tiny_llama_config(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 64})
    from distill.init import hybrid_config_from_teacher

    config = hybrid_config_from_teacher(teacher, StudentConfig(**REFERENCE_STUDENT))
    assert config.rope_parameters["rope_type"] == "llama3"
    assert (config.head_dim, config.num_key_value_heads, config.tie_word_embeddings) == (16, 2, True)
