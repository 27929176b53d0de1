"""Build the student from the teacher: pick the attention layers, map attention weights into the mixers.

Everything the teacher has is copied: embeddings, final norm, lm_head, every block's norms and MLP, and the
attention layers that stay. A Mamba layer takes C, B, x from q_proj, k_proj, v_proj (rows of `in_proj`) and
`out_proj` from o_proj (`init: attention`); z, dt, A, D and the conv start fresh, drawn from `seed`.
`init: random` leaves the whole mixer fresh: the ablation baseline.

Two optional fixes, to be measured: `conv_init: identity` starts the conv as a delta on the current token, so
the mixer initially sees silu(q), silu(k), silu(v) rather than a random mix of the last four tokens;
`norm_init: rms_ratio` scales each Mamba-2 gated norm so that the mixer's output has the RMS of the
attention output it replaces (measured on `calibration_input_ids`).
"""

from __future__ import annotations

import copy

import torch

from distill.configuration_hybrid import HybridConfig
from distill.modeling_hybrid import HybridForCausalLM, HybridMamba2Mixer
from distill.recipe import RecipeError, StudentConfig

_LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
    "attention_bias", "attention_dropout", "mlp_bias",
)


def select_attention_layers(
    num_layers: int,
    attention_layers: list[int] | None = None,
    attention_fraction: float | None = None,
    by: str = "placement",
) -> list[int]:
    """The sorted indices of the layers that keep attention.

    `attention_layers` is taken as given. `attention_fraction` f keeps k = round(f * num_layers) layers, the
    last of each of k equal groups: index floor((j + 1) * num_layers / k) - 1, which at f = 0.5 is every odd
    layer, the reference's placement. `by="data"` is the hook for choosing layers from measurements on data.
    """
    if by == "data":
        raise NotImplementedError(
            "data-driven attention layer selection is not implemented yet; set student.attention_layers "
            "or student.attention_fraction instead"
        )
    if by != "placement":
        raise ValueError(f"by={by!r}: choose 'placement' (or 'data', not implemented yet)")
    if (attention_layers is None) == (attention_fraction is None):
        raise RecipeError("student: set exactly one of attention_layers or attention_fraction")
    if attention_layers is not None:
        bad = [i for i in attention_layers if not 0 <= i < num_layers]
        if bad:
            raise RecipeError(
                f"student.attention_layers: {bad} out of range; the teacher has {num_layers} layers, "
                f"so use indices 0..{num_layers - 1}"
            )
        if len(set(attention_layers)) != len(attention_layers):
            raise RecipeError(f"student.attention_layers has duplicates: {attention_layers}")
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


def hybrid_config_from_teacher(teacher_config, student_cfg: StudentConfig) -> HybridConfig:
    """The student's config: the teacher's Llama fields, the chosen layer types and the mixer settings."""
    if getattr(teacher_config, "model_type", None) != "llama":
        raise RecipeError(
            f"teacher is a {getattr(teacher_config, 'model_type', '?')!r} model; the hybrid student is built from "
            "Llama-architecture teachers (LlamaForCausalLM)"
        )
    num_layers = teacher_config.num_hidden_layers
    attention = set(
        select_attention_layers(num_layers, student_cfg.attention_layers, student_cfg.attention_fraction)
    )
    mixer_types = ["attention" if i in attention else student_cfg.mixer for i in range(num_layers)]
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // teacher_config.num_attention_heads
    if teacher_config.attention_bias and len(attention) < num_layers:
        raise RecipeError(
            "the teacher's attention has biases but the Mamba in_proj has none, so q/k/v cannot be copied "
            "exactly; use a teacher with attention_bias=False or keep every layer as attention"
        )
    kv_width = teacher_config.num_key_value_heads * head_dim
    if student_cfg.mixer == "mamba1" and kv_width % (student_cfg.mamba1_d_state or head_dim):
        raise RecipeError(
            f"student.mamba1_d_state = {student_cfg.mamba1_d_state} must divide the teacher's kv width "
            f"num_key_value_heads * head_dim = {kv_width} (x and B come in groups of d_state); use a divisor such "
            f"as head_dim = {head_dim} (MambaInLlama uses 16)"
        )
    fields = {name: getattr(teacher_config, name) for name in _LLAMA_FIELDS if hasattr(teacher_config, name)}
    fields["head_dim"] = head_dim
    return HybridConfig(
        **fields,
        mixer_types=mixer_types,
        d_conv=student_cfg.d_conv,
        chunk_size=student_cfg.chunk_size,
        dt_min=student_cfg.dt_min,
        dt_max=student_cfg.dt_max,
        dt_init_floor=student_cfg.dt_init_floor,
        A_init_range=list(student_cfg.A_init_range),
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
    """A fp32 `HybridForCausalLM` initialised from `teacher` (a LlamaForCausalLM), on the teacher's device.

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
        if ".mamba." not in name:
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
    """in_proj's x, B, C rows <- v_proj, k_proj, q_proj; out_proj <- o_proj (both mixers order rows z|x|B|C)."""
    q, k, v = attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight
    start = mixer.d_inner  # z comes first
    for source in (v, k, q):
        mixer.in_proj.weight[start : start + source.shape[0]].copy_(source)
        start += source.shape[0]
    mixer.out_proj.weight.copy_(attention.o_proj.weight)


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
