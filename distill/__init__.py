"""mamba-distill: turn a pretrained Llama-family Transformer into an attention/Mamba hybrid."""

__version__ = "0.1.0"
