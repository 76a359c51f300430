"""Non-causal attention for the LLM backbones: the one place that builds bidirectional and block-causal masks.

The default (`openvla`) path never comes here: a 2-D `[B, L]` padding mask still goes through transformers'
`create_causal_mask`, unchanged. Policies that need another pattern (OpenVLA-OFT / VLA-Adapter: bidirectional; π0:
openpi's block-causal "prefix-LM" rule) build a 4-D mask `[B, 1, L, L]` here and pass it as `attention_mask=` to
`LLMBackbone` (or `backbone.llm.model`). How that reaches the attention, in transformers 5.x (checked in 5.24):

- `masking_utils._preprocess_mask_arguments` returns any 4-D mask as-is, so `create_causal_mask` (Llama) and the
  Qwen2 mask mapping (full and sliding layers) add no causality and no padding on top of it.
- sdpa (`integrations/sdpa_attention.py`) sets `is_causal = q_length > 1 and attention_mask is None and ...`, so a
  given mask always runs with `is_causal=False`; eager adds the mask to the scores.
- The mask's form is the one transformers itself builds for the backbone's attention implementation
  (`ALL_MASK_ATTENTION_FUNCTIONS`): boolean (True = attend) for sdpa, additive float (0 / `finfo(dtype).min`) for
  eager, which adds the mask to its scores and would misread a boolean one. Boolean sdpa masks need no dtype
  matching, so they survive autocast and FSDP2 mixed precision (which casts floating forward inputs only).

Not used: `config.is_causal = False` (transformers' switch to `create_bidirectional_mask`). With no padding that
returns no mask, and sdpa then falls back to the attention module's `is_causal = True`: causal again.

A query row with no allowed key (an all-padding row, or a padding query) would softmax over an empty set: NaN in some
kernels. Such rows attend to themselves instead; their outputs are padding and must be ignored by the caller, while
every real query sees exactly the pattern. The mask is a plain tensor without gradient, built once per batch outside
the decoder layers, so activation checkpointing (recomputation gets the same kwargs) and FSDP2 (per-layer units,
same mask on every layer) need nothing special.
"""

from typing import Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

# Attention implementations whose mask form is a dense 4-D tensor. flash_attention_* take only 2-D padding (no
# arbitrary pattern); flex_attention would need a BlockMask.
DENSE_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def block_causal_pattern(ar_mask: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """openpi's block rule: query i may attend to key j iff `cumsum(ar)[j] <= cumsum(ar)[i]` and both are real.

    `ar_mask [B, L]` (int/bool, 1 starts a new causal block; all zeros = one bidirectional block, all ones = causal),
    `padding_mask [B, L]` (1/True = real token). Returns the boolean pattern `[B, L, L]` (query, key), True = attend.
    """
    if ar_mask.shape != padding_mask.shape or ar_mask.ndim != 2:
        raise ValueError(f"ar_mask {tuple(ar_mask.shape)} and padding_mask {tuple(padding_mask.shape)} must both be "
                         "[B, L].")
    cumsum = ar_mask.long().cumsum(dim=-1)  # [B, L]
    real = padding_mask.bool()
    return (cumsum[:, None, :] <= cumsum[:, :, None]) & real[:, None, :] & real[:, :, None]


def bidirectional_pattern(padding_mask: torch.Tensor) -> torch.Tensor:
    """Every real query attends to every real key: boolean `[B, L, L]` from `padding_mask [B, L]` (1 = real)."""
    return block_causal_pattern(torch.zeros_like(padding_mask, dtype=torch.long), padding_mask)


def attend_to_self_when_empty(pattern: torch.Tensor) -> torch.Tensor:
    """`pattern [B, L, L]` with every row that allows no key attending to itself instead (no NaN in the softmax;
    such rows are padding, whose outputs the caller ignores)."""
    diagonal = torch.eye(pattern.shape[-1], dtype=torch.bool, device=pattern.device)
    return pattern.bool() | (~pattern.any(dim=-1, keepdim=True) & diagonal)


def attention_mask_from_pattern(pattern: torch.Tensor, dtype: torch.dtype = torch.float32,
                                attn_implementation: str = "sdpa") -> torch.Tensor:
    """The 4-D mask `[B, 1, L, L]` an LLM backbone takes as `attention_mask=` to attend by `pattern [B, L, L]`.

    Built by transformers' own mask interface for `attn_implementation` (the model's `config._attn_implementation`):
    boolean for sdpa, additive float of `dtype` (the attention's compute dtype) for eager. Rows of `pattern` without
    any True attend to themselves (no NaN; their outputs are padding).
    """
    if attn_implementation not in DENSE_MASK_IMPLEMENTATIONS:
        raise ValueError(f"Custom attention masks need attn_implementation in {DENSE_MASK_IMPLEMENTATIONS}, got "
                         f"{attn_implementation!r}. Fix: build the LLM backbone with attn_implementation='sdpa'.")
    batch_size, q_length, kv_length = pattern.shape
    if q_length != kv_length:
        raise ValueError(f"pattern must be square [B, L, L] (no KV cache), got {tuple(pattern.shape)}.")
    safe = attend_to_self_when_empty(pattern)  # [B, L, L]

    def mask_function(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
        # Index-based, as transformers' non-vmap expansion requires: indices broadcast to [B, 1, L, L].
        return safe[batch_idx, q_idx, kv_idx]

    return ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation](
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, mask_function=mask_function,
        attention_mask=None, allow_is_causal_skip=False, allow_is_bidirectional_skip=False, dtype=dtype,
        device=pattern.device)


def bidirectional_mask(padding_mask: torch.Tensor, dtype: torch.dtype = torch.float32,
                       attn_implementation: str = "sdpa") -> torch.Tensor:
    """4-D mask `[B, 1, L, L]` for full bidirectional attention over the real tokens of `padding_mask [B, L]`."""
    return attention_mask_from_pattern(bidirectional_pattern(padding_mask), dtype, attn_implementation)


def block_causal_mask(ar_mask: torch.Tensor, padding_mask: torch.Tensor, dtype: torch.dtype = torch.float32,
                      attn_implementation: str = "sdpa") -> torch.Tensor:
    """4-D mask `[B, 1, L, L]` for openpi's block-causal rule (see `block_causal_pattern`)."""
    return attention_mask_from_pattern(block_causal_pattern(ar_mask, padding_mask), dtype, attn_implementation)
