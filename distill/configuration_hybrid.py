"""Configuration of the attention/Mamba hybrid student.

The teacher's configuration (a Llama, Mistral, Qwen2, Qwen3 or SmolLM3 one, named by `teacher_model_type`)
plus, per layer, which mixer it uses (`mixer_types`: "attention", "mamba2" or "mamba1") and the mixers'
hyper-parameters. `layer_types` is derived from it in transformers' own vocabulary ("full_attention" /
"sliding_attention" for attention layers, as the teacher had them, "linear_attention" for Mamba layers), so
transformers builds the right cache (`DynamicCache(config)`: KV, windowed KV, or conv + SSM state) and the right
masks without model-specific code.

This file, like `modeling_hybrid.py`, imports only torch/transformers and its neighbour `families.py`: they are
copied into every checkpoint so that it loads with `trust_remote_code=True` where mamba-distill is not installed.
"""

import importlib
import math
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .families import TEACHER_MODEL_TYPES

MIXER_TYPES = ("attention", "mamba2", "mamba1")
ATTENTION_TYPES = ("full_attention", "sliding_attention")
AUTO_MAP = {
    "AutoConfig": "configuration_hybrid.HybridConfig",
    "AutoModelForCausalLM": "modeling_hybrid.HybridForCausalLM",
}


@strict
class HybridConfig(PreTrainedConfig):
    r"""
    The Llama fields keep Llama's meaning. The teacher-family fields:

    teacher_model_type: the teacher's `model_type` (one of `TEACHER_MODEL_TYPES`); attention layers, MLPs,
        norms and rotary embedding are that family's transformers classes, so they compute what the teacher's do.
    attention_types (`list[str]`): per layer, the teacher's attention: "full_attention" or "sliding_attention"
        (a causal window of `sliding_window` tokens). None: all full.
    sliding_window: the window of the sliding layers (None: no sliding layer).
    no_rope_layers (`list[int]`): SmolLM3's per-layer flag, 1 = RoPE, 0 = no positional encoding (NoPE).
    mamba_proj_bias: the mixers' in_proj and out_proj have biases (teachers with q/k/v biases: they start from
        the q/k/v biases, out_proj's from o_proj's or zero), as Bamba's `mamba_proj_bias`.
    mamba_bc_norm: a per-head RMSNorm on B and C right after in_proj, where Qwen3 applies k_norm and q_norm.

    The hybrid fields:

    mixer_types (`list[str]`): per layer, "attention" (the teacher family's attention), "mamba2" or "mamba1".
        Defaults to attention on odd layers and Mamba-2 on even ones.
    d_conv: width of the depthwise causal convolution of the Mamba mixers.
    chunk_size: chunk length of the Mamba-2 chunked scan.
    dt_min, dt_max, dt_init_floor: the initial time steps are log-uniform in [dt_min, dt_max], floored.
    A_init_range: Mamba-2's per-head A = -a with a uniform in this range at initialisation.
    mamba_norm_eps: eps of the Mamba-2 gated RMSNorm (None: `rms_norm_eps`).
    mamba2_d_state: Mamba-2 state size per head, the width of its B and C (None: `head_dim`, the width attention
        initialisation maps k and q onto; more adds state channels where attention is gone).
    mamba1_d_state: Mamba-1 state size per channel (None: `head_dim`, which attention initialisation needs).
    mamba1_dt_rank: rank of Mamba-1's time-step projection (None: ceil(hidden_size / 16)).
    """

    model_type = "distill_hybrid"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache"]

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int | None = 3
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False

    teacher_model_type: str = "llama"
    attention_types: list[str] | None = None
    sliding_window: int | None = None
    no_rope_layers: list[int] | None = None
    mamba_proj_bias: bool = False
    mamba_bc_norm: bool = False

    mixer_types: list[str] | None = None
    d_conv: int = 4
    chunk_size: int = 128
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_init_range: list[float] | tuple[float, float] = (1.0, 16.0)
    mamba_norm_eps: float | None = None
    mamba2_d_state: int | None = None
    mamba1_d_state: int | None = None
    mamba1_dt_rank: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.mixer_types is None:
            self.mixer_types = ["attention" if i % 2 else "mamba2" for i in range(self.num_hidden_layers)]
        self.mixer_types = list(self.mixer_types)
        if self.attention_types is None:
            self.attention_types = ["full_attention"] * self.num_hidden_layers
        self.attention_types = list(self.attention_types)
        if self.no_rope_layers is None and self.teacher_model_type == "smollm3":
            self.no_rope_layers = [1] * self.num_hidden_layers
        self.A_init_range = [float(v) for v in self.A_init_range]
        if self.mamba_norm_eps is None:
            self.mamba_norm_eps = self.rms_norm_eps
        if self.mamba2_d_state is None:
            self.mamba2_d_state = self.head_dim
        if self.mamba1_d_state is None:
            self.mamba1_d_state = self.head_dim
        if self.mamba1_dt_rank is None:
            self.mamba1_dt_rank = math.ceil(self.hidden_size / 16)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__post_init__(**kwargs)
        if __name__ == "distill.configuration_hybrid":  # our package, not a checkpoint's remote-code copy
            # registers the model with AutoModelForCausalLM (distill/registration.py): the Auto classes build the
            # config before they look up its model class. By name, because transformers' remote-code check reads
            # this file's import statements and would require our package wherever a checkpoint is loaded.
            importlib.import_module("distill.registration").register_model()

    @property
    def layer_types(self) -> list[str]:
        """transformers' layer vocabulary, which picks the cache layer and the mask of each layer."""
        return [
            kind if mixer == "attention" else "linear_attention"
            for mixer, kind in zip(self.mixer_types, self.attention_types)
        ]

    @property
    def use_sliding_window(self) -> bool:
        """Read by SmolLM3's attention (which only slides when this is set)."""
        return self.sliding_window is not None

    def validate_architecture(self):
        """Part of `@strict` validation: the mixers' shapes must be realisable."""
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give one of {MIXER_TYPES} per layer"
            )
        unknown = sorted(set(self.mixer_types) - set(MIXER_TYPES))
        if unknown:
            raise ValueError(f"mixer_types contains {unknown}; each entry must be one of {MIXER_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.teacher_model_type not in TEACHER_MODEL_TYPES:
            raise ValueError(
                f"teacher_model_type {self.teacher_model_type!r} is not supported; use one of {TEACHER_MODEL_TYPES}"
            )
        if len(self.attention_types) != self.num_hidden_layers or set(self.attention_types) - set(ATTENTION_TYPES):
            raise ValueError(f"attention_types must give one of {ATTENTION_TYPES} per layer, got {self.attention_types}")
        if "sliding_attention" in self.attention_types and self.sliding_window is None:
            raise ValueError("attention_types has sliding_attention layers but sliding_window is None")
        if self.no_rope_layers is not None and len(self.no_rope_layers) != self.num_hidden_layers:
            raise ValueError(f"no_rope_layers has {len(self.no_rope_layers)} entries for {self.num_hidden_layers} layers")
        if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")


__all__ = ["HybridConfig"]
