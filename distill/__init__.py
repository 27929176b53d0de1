"""mamba-distill: turn a pretrained Llama-family Transformer into an attention/Mamba hybrid."""

import os

# PyTorch's own switch for transparent huge pages on large CPU tensors, read at its first large allocation: fresh
# memory is page-faulted in 2 MiB at a time (filling a fresh 32 MiB tensor took 4.8 ms instead of 16.6 ms here).
# Every entry point imports distill first; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from transformers import AutoConfig, AutoModelForCausalLM

from distill.configuration_hybrid import HybridConfig
from distill.modeling_hybrid import HybridForCausalLM

__version__ = "0.1.0"

# `AutoModelForCausalLM.from_pretrained(checkpoint)` works for our checkpoints once `distill` is imported.
AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
