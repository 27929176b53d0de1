"""Build the student from the teacher: pick the attention layers, map attention weights into the mixers.

Teachers: Llama (2, 3.x), Mistral, Qwen2/2.5, Qwen3 and SmolLM3 (`distill.families`); the student reuses the
family's own attention, MLP and norm classes, and carries over what makes the family differ (q/k/v biases,
q/k norms, sliding windows, NoPE layers, RoPE scaling, tied or untied embeddings).

Everything the teacher has is copied: embeddings, final norm, lm_head, every block's norms and MLP, and the
attention layers that stay. A Mamba layer takes C, B, x from q_proj, k_proj, v_proj (rows of `in_proj`, with
their biases when the teacher has q/k/v biases; the z and dt rows' bias starts at zero) and `out_proj` from
o_proj (its bias, or zero) (`init: attention`); z, dt, A, D and the conv start fresh, drawn from `seed`.
`init: random` leaves the whole mixer fresh: the ablation baseline.

Qwen3 normalises each head of q and k (q_norm, k_norm) before RoPE. `bc_norm: true` (the default) gives the
mixer the same: a per-head RMSNorm on in_proj's C and B rows, initialised from q_norm and k_norm, so C and B
start as exactly the normed q and k the attention scored with; `bc_norm: false` drops the norms (C, B = the
raw q_proj, k_proj outputs). See docs/design.md for the measurement behind the default.

The calibrated defaults (they won the measurements, docs/findings.md): `conv_init: identity` starts the conv as a
delta on the current token, so the mixer initially sees silu(q), silu(k), silu(v) rather than a random mix of
the last four tokens; `norm_init: rms_ratio` scales each Mamba-2 gated norm so that the mixer's output has the
RMS of the attention output it replaces (measured on `calibration_input_ids`). `ones` and `random` are the
reference's.
"""

from __future__ import annotations

import copy

import torch

from distill.configuration_hybrid import HybridConfig
from distill.families import check_teacher_family
from distill.modeling_hybrid import HybridForCausalLM, HybridMamba2Mixer, is_mixer_param
from distill.recipe import RecipeError, StudentConfig, attention_layers_problem

_LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
    "attention_bias", "attention_dropout", "mlp_bias",
)


def select_attention_layers(
    num_layers: int,
    attention_layers: list[int] | str = "uniform",
    attention_fraction: float | None = None,
) -> list[int]:
    """The sorted indices of the layers that keep attention.

    A list is taken as given. `uniform` with `attention_fraction` f keeps k = round(f * num_layers) layers, the
    last of each of k equal groups: index floor((j + 1) * num_layers / k) - 1, which at f = 0.5 is every odd
    layer, the reference's placement. Layers chosen from data (`auto`) are resolved by distill.selection before
    the student is built.
    """
    if attention_layers == "auto":
        raise RecipeError("student.attention_layers = 'auto' is chosen from data by the selection stage before the "
                          "student is built; build it directly from a list or 'uniform'")
    if isinstance(attention_layers, list):
        if problem := attention_layers_problem(attention_layers, num_layers):
            raise RecipeError(f"student.attention_layers: {problem}")
        return sorted(attention_layers)
    if not 0.0 <= attention_fraction <= 1.0:
        raise RecipeError(f"student.attention_fraction = {attention_fraction}: must be between 0 and 1")
    k = round(attention_fraction * num_layers)
    if k == 0 and attention_fraction > 0:
        raise RecipeError(
            f"student.attention_fraction = {attention_fraction} keeps 0 of {num_layers} layers; use 0 for a pure "
            f"Mamba student or at least {1 / num_layers:.3g} for one attention layer"
        )
    return [(j + 1) * num_layers // k - 1 for j in range(k)]


def family_fields(teacher_config) -> dict:
    """The HybridConfig fields that carry the family's differences: attention kinds, window, NoPE, bias, norms."""
    model_type = teacher_config.model_type
    num_layers = teacher_config.num_hidden_layers
    window = getattr(teacher_config, "sliding_window", None)
    if model_type == "smollm3" and not teacher_config.use_sliding_window:
        window = None  # SmolLM3's attention only slides with use_sliding_window (Qwen's config nulls the window)
    teacher_types = getattr(teacher_config, "layer_types", None)
    if window is None:
        kinds = ["full_attention"] * num_layers
    elif teacher_types is None:  # Mistral: one window for every layer
        kinds = ["sliding_attention"] * num_layers
    else:
        kinds = ["sliding_attention" if kind == "sliding_attention" else "full_attention" for kind in teacher_types]
    return {
        "teacher_model_type": model_type,
        "attention_types": kinds,
        "sliding_window": window if "sliding_attention" in kinds else None,
        "no_rope_layers": list(teacher_config.no_rope_layers) if model_type == "smollm3" else None,
        "mamba_proj_bias": model_type == "qwen2" or bool(getattr(teacher_config, "attention_bias", False)),
    }


def hybrid_config_from_teacher(teacher_config, student_cfg: StudentConfig) -> HybridConfig:
    """The student's config: the teacher's fields, the chosen layer types and the mixer settings."""
    check_teacher_family(getattr(teacher_config, "model_type", None))
    num_layers = teacher_config.num_hidden_layers
    attention = set(
        select_attention_layers(num_layers, student_cfg.attention_layers, student_cfg.attention_fraction)
    )
    mixer_types = ["attention" if i in attention else student_cfg.mixer for i in range(num_layers)]
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // teacher_config.num_attention_heads
    kv_width = teacher_config.num_key_value_heads * head_dim
    if student_cfg.mixer == "mamba1" and kv_width % (student_cfg.mamba1_d_state or head_dim):
        raise RecipeError(
            f"student.mamba1_d_state = {student_cfg.mamba1_d_state} must divide the teacher's kv width "
            f"num_key_value_heads * head_dim = {kv_width} (x and B come in groups of d_state); use a divisor such "
            f"as head_dim = {head_dim} (MambaInLlama uses 16)"
        )
    bc_norm = student_cfg.bc_norm and teacher_config.model_type == "qwen3"
    d_state = student_cfg.mamba2_d_state
    if d_state is not None and d_state < head_dim:
        raise RecipeError(
            f"student.mamba2_d_state = {d_state} is below the teacher's head_dim = {head_dim}, the width attention "
            f"initialisation maps each head's q and k onto; use {head_dim} or more (or leave it unset)"
        )
    if d_state not in (None, head_dim) and bc_norm:
        raise RecipeError(
            f"student.mamba2_d_state = {d_state} needs student.bc_norm: false with a Qwen3 teacher (B and C's "
            f"per-head norms start from k_norm and q_norm, {head_dim} wide); or leave mamba2_d_state unset"
        )
    fields = {name: getattr(teacher_config, name) for name in _LLAMA_FIELDS if hasattr(teacher_config, name)}
    fields["head_dim"] = head_dim
    return HybridConfig(
        **fields,
        **family_fields(teacher_config),
        mamba_bc_norm=bc_norm,
        mixer_types=mixer_types,
        d_conv=student_cfg.d_conv,
        chunk_size=student_cfg.chunk_size,
        dt_min=student_cfg.dt_min,
        dt_max=student_cfg.dt_max,
        dt_init_floor=student_cfg.dt_init_floor,
        A_init_range=list(student_cfg.A_init_range),
        mamba2_d_state=d_state,
        mamba1_d_state=student_cfg.mamba1_d_state,
        mamba1_dt_rank=student_cfg.mamba1_dt_rank,
        attn_implementation=teacher_config._attn_implementation,
    )


@torch.no_grad()
def hybrid_from_teacher(
    teacher,
    student_cfg: StudentConfig,
    seed: int = 0,
    calibration_input_ids: torch.Tensor | None = None,
) -> HybridForCausalLM:
    """A fp32 `HybridForCausalLM` initialised from `teacher` (a supported *ForCausalLM), on the teacher's device.

    `seed` draws every fresh parameter (without touching the global RNG). `calibration_input_ids`, a
    (batch, seq) or (seq,) LongTensor of a few hundred tokens of ordinary text (e.g. a training row), is
    required by `norm_init: rms_ratio` and unused otherwise.
    """
    config = hybrid_config_from_teacher(teacher.config, student_cfg)
    if student_cfg.norm_init == "rms_ratio" and calibration_input_ids is None:
        raise RecipeError(
            "student.norm_init = rms_ratio needs calibration tokens: pass calibration_input_ids to "
            "hybrid_from_teacher, or use norm_init: ones"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = HybridForCausalLM(config)
    student.to(teacher.device)
    student.generation_config = copy.deepcopy(teacher.generation_config)

    teacher_state = teacher.state_dict()
    for name, param in student.named_parameters():
        if not is_mixer_param(name):
            param.copy_(teacher_state[name])
    for index, layer in enumerate(student.model.layers):
        if layer.mixer_type == "attention":
            continue
        mixer = layer.mamba
        if student_cfg.init == "attention":
            copy_attention_into_mixer(teacher.model.layers[index].self_attn, mixer)
        if student_cfg.conv_init == "identity":
            mixer.conv1d.weight.zero_()
            mixer.conv1d.weight[:, 0, -1] = 1.0
            mixer.conv1d.bias.zero_()
    if student_cfg.norm_init == "rms_ratio":
        ids = calibration_input_ids if calibration_input_ids.dim() == 2 else calibration_input_ids[None]
        match_output_rms(teacher, student, ids.to(teacher.device))
    return student


def copy_attention_into_mixer(attention, mixer) -> None:
    """in_proj's x, B, C rows <- v_proj, k_proj, q_proj; out_proj <- o_proj (both mixers order rows z|x|B|C).

    Biases go along (the other in_proj rows' bias and a bias-free o_proj's counterpart are zero), and with
    `mamba_bc_norm` B_norm <- k_norm, C_norm <- q_norm. A Mamba-2 state wider than a head (d_state n > hd):
    k and q fill the first hd of each head's n rows of B and C; C's other rows and their conv bias are zeroed,
    so those state channels add nothing at first (silu(0) = 0), and B's keep their random init, so gradients
    reach them.
    """
    hd = mixer.head_dim
    per_head = mixer.d_state if isinstance(mixer, HybridMamba2Mixer) else hd  # B and C rows per head
    start = mixer.d_inner  # z comes first
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias.zero_()
    for source, width in ((attention.v_proj, hd), (attention.k_proj, per_head), (attention.q_proj, per_head)):
        heads = source.weight.shape[0] // hd
        block = slice(start, start + heads * width)
        weight = mixer.in_proj.weight[block].view(heads, width, -1)
        weight[:, :hd].copy_(source.weight.view(heads, hd, -1))
        if source is attention.q_proj and width > hd:  # C's extra state channels (the Mamba-2 conv covers them)
            weight[:, hd:].zero_()
            channels = slice(block.start - mixer.d_inner, block.stop - mixer.d_inner)
            mixer.conv1d.bias[channels].view(heads, width)[:, hd:].zero_()
        if source.bias is not None:
            mixer.in_proj.bias[block].view(heads, width)[:, :hd].copy_(source.bias.view(heads, hd))
        start += heads * width
    mixer.out_proj.weight.copy_(attention.o_proj.weight)
    if mixer.out_proj.bias is not None and attention.o_proj.bias is not None:
        mixer.out_proj.bias.copy_(attention.o_proj.bias)
    elif mixer.out_proj.bias is not None:
        mixer.out_proj.bias.zero_()
    if mixer.bc_norm:
        mixer.B_norm.weight.copy_(attention.k_norm.weight)
        mixer.C_norm.weight.copy_(attention.q_norm.weight)


def match_output_rms(teacher, student, input_ids: torch.Tensor) -> None:
    """Set each Mamba-2 gated-norm weight to RMS(attention's o_proj input) / RMS(mixer's out_proj input).

    Both are measured on the teacher's own attention inputs for `input_ids`, with the norm weight at one, so
    out_proj (= o_proj) initially receives inputs of the scale it was trained on.
    """
    mixers = {
        i: layer.mamba for i, layer in enumerate(student.model.layers) if isinstance(getattr(layer, "mamba", None), HybridMamba2Mixer)
    }
    captured, hooks = {}, []
    for i in mixers:
        attention = teacher.model.layers[i].self_attn
        hooks.append(attention.register_forward_pre_hook(_save(captured, ("input", i)), with_kwargs=True))
        hooks.append(attention.o_proj.register_forward_pre_hook(_save(captured, ("o_proj", i)), with_kwargs=True))
    try:
        teacher(input_ids=input_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    for i, mixer in mixers.items():
        mixer.norm.weight.fill_(1.0)
        hook = mixer.out_proj.register_forward_pre_hook(_save(captured, ("out_proj", i)), with_kwargs=True)
        try:
            mixer(captured["input", i].to(mixer.in_proj.weight.dtype))
        finally:
            hook.remove()
        mixer.norm.weight.fill_(_rms(captured["o_proj", i]) / _rms(captured["out_proj", i]))


def _save(store: dict, key):
    def hook(module, args, kwargs):
        store[key] = (args[0] if args else kwargs["hidden_states"]).detach().float()

    return hook


def _rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()
