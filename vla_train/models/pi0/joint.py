"""π0's shared attention: a PaliGemma LLM (Gemma 2B) and a smaller Gemma action expert (300M) attend jointly.

The VLM is the LLM backbone's transformers `GemmaModel`; the expert is a stack of `GemmaDecoderLayer`s with the same
depth, heads, KV heads, head dim and RoPE theta, and its own width and MLP size; layer i of both is one
`JointDecoderLayer` in the VLM's `layers`. At layer i each stack ("expert") takes its own tokens (the VLM the
prefix: images then language; the action expert the suffix: state and action tokens) through its own input RMSNorm
(Gemma's `(1 + weight)` form) and q/k/v projections; the queries, keys and values are concatenated along the sequence
(prefix first), rotated with RoPE at the given positions (`cumsum(pad_mask) - 1`), and one attention (scale
`head_dim ** -0.5`, grouped KV heads, no softcapping) runs over them under the given mask; the result is split back,
and each expert applies its own `o_proj`, residual, post-attention RMSNorm, gated-GELU MLP and residual. Each stack
ends with its own final norm. Facts: openpi `PaliGemmaWithExpertModel`, LeRobot `paligemma_with_expert.py`.

Inference caches the prefix's post-RoPE keys and values per layer (`use_cache=True` on a prefix-only call) and then
runs the suffix alone against them (`past=`), which equals the joint pass because the prefix never attends to the
suffix (π0's block mask, `models/attention.py` `block_causal_pattern`).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GemmaConfig, GemmaModel
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, apply_rotary_pos_emb

KV = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values [B, KV heads, L, head dim], after RoPE
SHARED_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_parameters")


def joint_layer(layers: Sequence[GemmaDecoderLayer], hidden: Sequence[torch.Tensor | None],
                attention_mask: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                past: KV | None = None) -> tuple[list[torch.Tensor | None], KV]:
    """One joint layer. `hidden[e]`: expert e's tokens `[B, L_e, D_e]` (None: it has none in this call);
    `attention_mask`: boolean `[B, 1, L, L_past + L]` (True = attend; L = sum of L_e); `position_embeddings`: RoPE
    `(cos, sin)` `[B, L, head dim]` of this call's tokens; `past`: cached keys / values to prepend. Returns the new
    hidden states per expert and this call's keys / values (post-RoPE, for a cache)."""
    queries, keys, values, lengths = [], [], [], []
    for layer, x in zip(layers, hidden, strict=True):
        lengths.append(0 if x is None else x.shape[1])
        if x is None:
            continue
        attention, h = layer.self_attn, layer.input_layernorm(x)
        shape = (x.shape[0], x.shape[1], -1, attention.head_dim)
        queries.append(attention.q_proj(h).view(shape).transpose(1, 2))
        keys.append(attention.k_proj(h).view(shape).transpose(1, 2))
        values.append(attention.v_proj(h).view(shape).transpose(1, 2))
    query, key = apply_rotary_pos_emb(torch.cat(queries, 2), torch.cat(keys, 2), *position_embeddings)
    value = torch.cat(values, 2)
    new = (key, value)
    if past is not None:
        key, value = torch.cat([past[0], key], 2), torch.cat([past[1], value], 2)
    scale = layers[0].self_attn.scaling
    out = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype), attn_mask=attention_mask,
                                         scale=scale, enable_gqa=True)  # [B, heads, L, head dim]
    out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    outputs: list[torch.Tensor | None] = []
    start = 0
    for layer, x, length in zip(layers, hidden, lengths, strict=True):
        if x is None:
            outputs.append(None)
            continue
        x = x + layer.self_attn.o_proj(out[:, start:start + length].to(x.dtype))
        outputs.append(x + layer.mlp(layer.post_attention_layernorm(x)))
        start += length
    return outputs, new


def check_shared_geometry(vlm_config: GemmaConfig, expert_config: GemmaConfig) -> None:
    """Raise unless the two experts share depth, heads, KV heads, head dim and RoPE (they attend jointly)."""
    different = [f"{name} {getattr(vlm_config, name)} vs {getattr(expert_config, name)}" for name in SHARED_FIELDS
                 if getattr(vlm_config, name) != getattr(expert_config, name)]
    if different:
        raise ValueError(f"The VLM and the action expert share attention layer by layer, so they need the same "
                         f"{', '.join(SHARED_FIELDS)}; they differ in {different}.")


class JointDecoderLayer(nn.Module):
    """Layer i of both experts as one module: it adopts the VLM's `GemmaDecoderLayer` children (same names, hence
    the same state-dict keys: `layers.i.self_attn...`) and owns the action expert's layer i as `expert`
    (`layers.i.expert...`). It is the FSDP2 and activation-checkpointing unit: one all-gather brings both layers'
    weights, which the shared attention needs at once (docs/architecture.md, "π0")."""

    def __init__(self, vlm_layer: GemmaDecoderLayer, expert_layer: GemmaDecoderLayer) -> None:
        super().__init__()
        for name, child in vlm_layer.named_children():
            self.add_module(name, child)
        self.expert = expert_layer

    def forward(self, prefix: torch.Tensor | None, suffix: torch.Tensor | None, attention_mask: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], past: KV | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, KV]:
        """`joint_layer` over (the VLM's prefix, the expert's suffix); returns both and this call's keys / values."""
        (prefix, suffix), kv = joint_layer([self, self.expert], [prefix, suffix], attention_mask, position_embeddings,
                                           past)
        return prefix, suffix, kv


def joint_forward(model: GemmaModel, expert_norm: nn.Module, prefix: torch.Tensor | None,
                  suffix: torch.Tensor | None, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  past: Sequence[KV] | None = None, use_cache: bool = False
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[KV] | None]:
    """Run `model`'s joint layers (`model.layers`: `JointDecoderLayer`s, possibly wrapped) over `prefix [B, L_p,
    D_vlm]` / `suffix [B, L_s, D_expert]` embeddings (either may be None) with a boolean mask `[B, 1, L, L_past + L]`
    (True = attend) and `position_ids [B, L]`; `past`: a prefix cache from a `use_cache` call. Returns the
    final-normed prefix (`model.norm`) and suffix (`expert_norm`) states and, with `use_cache`, each layer's keys /
    values."""
    reference = prefix if prefix is not None else suffix
    if reference is None:
        raise ValueError("The joint Gemma pass needs prefix or suffix embeddings.")
    position_embeddings = model.rotary_emb(reference, position_ids)
    cache: list[KV] = []
    for index, layer in enumerate(model.layers):
        prefix, suffix, kv = layer(prefix, suffix, attention_mask, position_embeddings,
                                   None if past is None else past[index])
        cache.append(kv)
    prefix_out = None if prefix is None else model.norm(prefix)
    suffix_out = None if suffix is None else expert_norm(suffix)
    return prefix_out, suffix_out, cache if use_cache else None
