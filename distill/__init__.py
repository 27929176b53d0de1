"""mamba-distill: turn a pretrained Llama-family Transformer into an attention/Mamba hybrid."""

from transformers import AutoConfig, AutoModelForCausalLM

from distill.configuration_hybrid import HybridConfig
from distill.modeling_hybrid import HybridForCausalLM

__version__ = "0.1.0"

# `AutoModelForCausalLM.from_pretrained(checkpoint)` works for our checkpoints once `distill` is imported.
AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
