"""mamba-distill: turn a pretrained Llama-family Transformer into an attention/Mamba hybrid.

`import distill` loads neither torch nor transformers, so `distill validate` and `distill --help` answer at once,
and it registers the hybrid with transformers' Auto classes: after it, `AutoModelForCausalLM.from_pretrained(
checkpoint)` loads the installed `HybridForCausalLM` without `trust_remote_code`. The registration costs nothing
until transformers loads its Auto classes (`distill/registration.py`).
"""

import os

# PyTorch's own switch for transparent huge pages on large CPU tensors, read at its first large allocation: fresh
# memory is page-faulted in 2 MiB at a time (filling a fresh 32 MiB tensor took 4.8 ms instead of 16.6 ms here).
# Every entry point imports distill first; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from distill import registration

registration.install()

__version__ = "0.1.0"


def __getattr__(name: str):
    """`distill.HybridConfig` and `distill.HybridForCausalLM`, imported on first use (PEP 562)."""
    if name in ("HybridConfig", "HybridForCausalLM"):
        from distill import modeling_hybrid

        return getattr(modeling_hybrid, name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
