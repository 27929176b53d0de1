"""Configuration of the attention/Mamba hybrid student.

A Llama configuration plus, per layer, which mixer it uses (`mixer_types`: "attention", "mamba2" or
"mamba1") and the mixers' hyper-parameters. `layer_types` is derived from it in transformers' own vocabulary
("full_attention" / "linear_attention"), so transformers builds the right cache (`DynamicCache(config)`: KV for
attention layers, conv + SSM state for Mamba layers) and the right masks without model-specific code.

This file, like `modeling_hybrid.py`, imports only torch/transformers: both are copied into every checkpoint
so that it loads with `trust_remote_code=True` where mamba-distill is not installed.
"""

import math
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

MIXER_TYPES = ("attention", "mamba2", "mamba1")
AUTO_MAP = {
    "AutoConfig": "configuration_hybrid.HybridConfig",
    "AutoModelForCausalLM": "modeling_hybrid.HybridForCausalLM",
}


@strict
class HybridConfig(PreTrainedConfig):
    r"""
    The Llama fields keep Llama's meaning. The hybrid fields:

    mixer_types (`list[str]`): per layer, "attention" (a Llama attention layer), "mamba2" or "mamba1".
        Defaults to attention on odd layers and Mamba-2 on even ones.
    d_conv: width of the depthwise causal convolution of the Mamba mixers.
    chunk_size: chunk length of the Mamba-2 chunked scan.
    dt_min, dt_max, dt_init_floor: the initial time steps are log-uniform in [dt_min, dt_max], floored.
    A_init_range: Mamba-2's per-head A = -a with a uniform in this range at initialisation.
    mamba_norm_eps: eps of the Mamba-2 gated RMSNorm (None: `rms_norm_eps`).
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

    mixer_types: list[str] | None = None
    d_conv: int = 4
    chunk_size: int = 128
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_init_range: list[float] | tuple[float, float] = (1.0, 16.0)
    mamba_norm_eps: float | None = None
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
        self.A_init_range = [float(v) for v in self.A_init_range]
        if self.mamba_norm_eps is None:
            self.mamba_norm_eps = self.rms_norm_eps
        if self.mamba1_d_state is None:
            self.mamba1_d_state = self.head_dim
        if self.mamba1_dt_rank is None:
            self.mamba1_dt_rank = math.ceil(self.hidden_size / 16)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__post_init__(**kwargs)

    @property
    def layer_types(self) -> list[str]:
        """transformers' layer vocabulary, which picks the cache layer and the mask of each layer."""
        return ["full_attention" if m == "attention" else "linear_attention" for m in self.mixer_types]

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
        if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")


__all__ = ["HybridConfig"]
