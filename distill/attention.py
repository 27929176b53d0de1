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

One query in bf16 or fp16 on a CPU (a decode step) is computed as two fp32 matrix products instead, each
key/value head's query heads as the rows of one product: PyTorch's CPU flash kernel is slow for exactly that
case (in bf16 it takes one query as long as five), and this halves a bf16 decode step's attention
(`scripts/bench_speculative.py --dtypes bfloat16 --attention sdpa sdpa_gqa`: SmolLM2 at 2k, 106 -> 48 ms
over 30 layers). fp32, and several queries (a verification, a prefill), keep the kernel.

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
    reduced = query.dtype in (torch.bfloat16, torch.float16)
    if queries == 1 and reduced and query.device.type == "cpu" and not dropout:
        return one_query_attention(query, key, value, attention_mask, scaling), None
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


def one_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of one query per sequence in fp32, returned in the query's dtype and sdpa's output layout.
    Query head `j * groups + i` reads key/value head `j` (the order of transformers' `repeat_kv`)."""
    batch, heads, _, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    scores = query.reshape(batch, kv_heads, groups, head_dim).float() @ key.float().transpose(-1, -2) * scale
    if mask is not None:  # (batch, 1 or heads, 1, keys): True (or 0) where a key is seen
        mask = mask.reshape(mask.shape[0], kv_heads if mask.shape[1] == heads else 1, -1, keys)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    output = scores.softmax(-1) @ value.float()  # (batch, kv_heads, groups, head_dim)
    return output.reshape(batch, 1, heads, head_dim).to(query.dtype)


AttentionInterface.register(NAME, sdpa_gqa_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
