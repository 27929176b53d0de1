"""`sdpa_gqa`: transformers' SDPA attention that never copies key/value heads, registered under that name.

transformers' `sdpa` folds the query heads onto the key/value heads (GQA) only for one query or an unmasked
forward; a masked forward of several queries (verifying drafted tokens, a chunked or left-padded prefill)
first copies every key and value head `num_key_value_groups` times (`repeat_kv`), because some GPU kernels
take GQA only without a mask. PyTorch's SDPA takes both at once (`enable_gqa` with `attn_mask`), so this
skips the copy and computes the same attention: on one CPU thread, SmolLM2's 5 queries over 2k cached tokens
take 0.84 ms a layer instead of 2.2 ms (`scripts/bench_speculative.py --attention sdpa sdpa_gqa` times whole
verifications). Use it like any implementation once this module is imported (`import distill.attention`;
`distill chat` does):

    AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa_gqa")   # or
    model.set_attn_implementation("sdpa_gqa")

It takes sdpa's masks; what sdpa does beyond plain attention (softcapping, position biases, attention sinks)
is refused, so a model that needs it keeps `sdpa`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_gqa"


def sdpa_gqa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """(batch, heads, queries, head_dim) query, (batch, kv_heads, keys, head_dim) key and value -> (batch,
    queries, heads, head_dim), as transformers' `sdpa_attention_forward` returns it."""
    unsupported = [name for name in ("softcap", "position_bias", "s_aux") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"{NAME} does not support {', '.join(unsupported)}: use attn_implementation='sdpa'")
    queries = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=queries > 1 and attention_mask is None and is_causal,  # as sdpa: a mask already says it
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, sdpa_gqa_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
