import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from transformers import masking_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vla_train.models.attention import (
    attention_mask_from_pattern,
    bidirectional_mask,
    bidirectional_pattern,
    block_causal_mask,
    block_causal_pattern,
)
from vla_train.models.llm import LLMBackbone, get_llm_backbone_spec, shrink_architecture

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
FAMILIES = {"llama": "tiny-llama", "qwen2": "tiny-qwen25"}
IMPLEMENTATIONS = ("sdpa", "eager")
# Right padding, as the VLM collator pads; row 2 is padding only (no NaN allowed anywhere).
PADDING = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)


def _backbone(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> LLMBackbone:
    """A tiny random backbone, float32, eval mode, with weights large enough for sharp, token-dependent attention."""
    spec = shrink_architecture(get_llm_backbone_spec(FAMILIES[family]), **SMALL)
    torch.manual_seed(seed)
    backbone = LLMBackbone.from_config(spec, attn_implementation=attn_implementation)
    with torch.no_grad():
        for name, parameter in backbone.llm.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(std=0.3)
    return backbone.eval()


def _inputs(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*PADDING.shape, SMALL["hidden_size"])  # inputs_embeds [B, L, d]


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _reference(model: torch.nn.Module, embeds: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Decoder by hand (norms, q/k/v, RoPE from the model's rotary module, GQA repeat, softmax over the keys that
    `allowed [B, L, L]` permits, o_proj, SwiGLU MLP): last hidden states `[B, L, d]`. Rows without keys give 0."""
    batch, length, _ = embeds.shape
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    cos, sin = model.rotary_emb(embeds, torch.arange(length)[None])  # [1, L, head_dim]
    cos, sin = cos[:, None], sin[:, None]
    hidden = embeds
    for layer in model.layers:
        attn = layer.self_attn
        x = _rms_norm(hidden, layer.input_layernorm)
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, length, heads, head_dim).transpose(1, 2)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5  # [B, H, L, L]
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
        hidden = hidden + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
        x = _rms_norm(hidden, layer.post_attention_layernorm)
        hidden = hidden + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))
    return _rms_norm(hidden, model.norm)


def _causal_pattern(padding: torch.Tensor) -> torch.Tensor:
    return block_causal_pattern(torch.ones_like(padding, dtype=torch.long), padding)


@pytest.mark.parametrize("family,attn_implementation", list(itertools.product(FAMILIES, IMPLEMENTATIONS)))
def test_bidirectional_mask_matches_masked_softmax_reference(family, attn_implementation):
    backbone, embeds = _backbone(family, attn_implementation), _inputs()
    real = PADDING
    mask = bidirectional_mask(PADDING, embeds.dtype, attn_implementation)
    assert mask.shape == (3, 1, 7, 7) and mask.dtype == (torch.bool if attn_implementation == "sdpa" else torch.float32)
    with torch.no_grad():
        bidirectional = backbone.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        via_backbone = backbone(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        causal = backbone.llm.model(inputs_embeds=embeds, attention_mask=PADDING.long()).last_hidden_state
        reference = _reference(backbone.llm.model, embeds, bidirectional_pattern(PADDING))
        causal_reference = _reference(backbone.llm.model, embeds, _causal_pattern(PADDING))

    assert torch.isfinite(bidirectional).all() and torch.isfinite(via_backbone.logits).all()
    torch.testing.assert_close(bidirectional[real], reference[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(via_backbone.hidden_states[-1], bidirectional, rtol=0, atol=0)
    # The reference is the model's own computation: it reproduces the default causal path too.
    torch.testing.assert_close(causal[real], causal_reference[real], rtol=0, atol=1e-5)
    # No causality on top: early positions see later tokens (rows 0 and 1 differ from the causal output there).
    assert (bidirectional[:2, 0] - causal[:2, 0]).abs().amax(-1).min() > 1e-2
    # ... but the padding keys stay masked: changing the padding embeddings leaves the real outputs unchanged.
    noisy = torch.where(PADDING[..., None], embeds, embeds + 5 * torch.randn_like(embeds))
    with torch.no_grad():
        repadded = backbone.llm.model(inputs_embeds=noisy, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(repadded[real], bidirectional[real], rtol=0, atol=1e-5)


def _brute_force_pattern(ar_mask: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    batch, length = ar_mask.shape
    pattern = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        cumsum = [sum(int(a) for a in ar_mask[b, : t + 1]) for t in range(length)]
        for i in range(length):
            for j in range(length):
                pattern[b, i, j] = cumsum[j] <= cumsum[i] and bool(padding[b, i]) and bool(padding[b, j])
    return pattern


@pytest.mark.parametrize("seed", range(5))
def test_block_causal_pattern_is_openpi_cumulative_rule(seed):
    generator = torch.Generator().manual_seed(seed)
    ar_mask = torch.randint(0, 2, (4, 9), generator=generator)
    padding = torch.rand(4, 9, generator=generator) > 0.3
    padding[0], padding[1, 6:] = True, False
    expected = _brute_force_pattern(ar_mask, padding)
    assert torch.equal(block_causal_pattern(ar_mask, padding), expected)
    assert torch.equal(block_causal_pattern(ar_mask.bool(), padding.long()), expected)  # int/bool either way
    # Bidirectional is one block; the 4-D masks carry the pattern on real queries (both mask forms).
    assert torch.equal(bidirectional_pattern(padding), _brute_force_pattern(torch.zeros_like(ar_mask), padding))
    sdpa = block_causal_mask(ar_mask, padding)[:, 0]
    eager = block_causal_mask(ar_mask, padding, torch.float32, "eager")[:, 0]
    assert torch.equal(sdpa[padding], expected[padding])
    assert torch.equal((eager == 0)[padding], expected[padding])
    assert torch.equal(eager == 0, sdpa) and set(eager.unique().tolist()) <= {0.0, torch.finfo(torch.float32).min}
    # Padding queries attend only to themselves (no empty softmax).
    assert torch.equal(sdpa[~padding], torch.eye(9, dtype=torch.bool).expand(4, 9, 9)[~padding])


@pytest.mark.parametrize("family,attn_implementation", list(itertools.product(FAMILIES, IMPLEMENTATIONS)))
def test_block_causal_mask_on_the_model(family, attn_implementation):
    backbone, embeds = _backbone(family, attn_implementation), _inputs()
    real = PADDING
    causal_blocks = block_causal_mask(torch.ones(3, 7, dtype=torch.long), PADDING, embeds.dtype, attn_implementation)
    prefix_lm_ar = torch.tensor([0, 0, 0, 1, 0, 1, 0]).expand(3, -1)  # prefix [0, 3), then blocks [3, 5), [5, 7)
    prefix_lm = block_causal_mask(prefix_lm_ar, PADDING, embeds.dtype, attn_implementation)
    with torch.no_grad():
        default = backbone.llm.model(inputs_embeds=embeds, attention_mask=PADDING.long()).last_hidden_state
        blocks = backbone.llm.model(inputs_embeds=embeds, attention_mask=causal_blocks).last_hidden_state
        prefix = backbone.llm.model(inputs_embeds=embeds, attention_mask=prefix_lm).last_hidden_state
        reference = _reference(backbone.llm.model, embeds, block_causal_pattern(prefix_lm_ar, PADDING))
    torch.testing.assert_close(blocks[real], default[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(prefix[real], reference[real], rtol=0, atol=1e-5)
    assert torch.isfinite(prefix).all() and (prefix[0, 0] - default[0, 0]).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_default_causal_path_is_untouched(family):
    backbone, embeds = _backbone(family), _inputs()
    with torch.no_grad():
        before = backbone(inputs_embeds=embeds[:2], attention_mask=PADDING[:2].long()).logits
        bidirectional_mask(PADDING, embeds.dtype)
        block_causal_mask(torch.ones(3, 7, dtype=torch.long), PADDING, embeds.dtype, "eager")
        after = backbone(inputs_embeds=embeds[:2], attention_mask=PADDING[:2].long()).logits
        no_mask = backbone.llm.model(inputs_embeds=embeds[:1]).last_hidden_state
        reference = _reference(backbone.llm.model, embeds[:1], _causal_pattern(PADDING[:1]))
    assert torch.equal(before, after)
    torch.testing.assert_close(no_mask, reference, rtol=0, atol=1e-5)
    # Nothing global is patched: transformers' registries and the model's causal flags are as shipped.
    assert masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is masking_utils.sdpa_mask
    assert masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["eager"] is masking_utils.eager_mask
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    assert getattr(backbone.llm.config, "is_causal", True) is True
    assert all(layer.self_attn.is_causal for layer in backbone.transformer_layers)


@pytest.mark.parametrize("family,attn_implementation", list(itertools.product(FAMILIES, IMPLEMENTATIONS)))
def test_gradients_checkpointing_and_bf16_autocast(family, attn_implementation):
    backbone, embeds = _backbone(family, attn_implementation).train(), _inputs()
    mask = bidirectional_mask(PADDING, embeds.dtype, attn_implementation)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        backbone.zero_grad()
        leaf = embeds.clone().requires_grad_()
        hidden = backbone.llm.model(inputs_embeds=leaf, attention_mask=mask).last_hidden_state
        hidden[PADDING][:, 0].sum().backward()  # real outputs only
        return leaf.grad, [p.grad.clone() for p in backbone.transformer_layers.parameters()]

    input_grad, grads = run()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(input_grad).all()
    assert input_grad[~PADDING].abs().max() == 0  # padding keys are masked: no gradient reaches them
    assert input_grad[1, 3].abs().max() > 0  # the last real token of row 1 feeds its first position's output
    # Activation checkpointing as training/parallelize.py applies it: non-reentrant wrappers around each layer.
    for container in backbone.activation_checkpoint_containers():
        for index, block in enumerate(container):
            container[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                  preserve_rng_state=False)
    checkpointed_input_grad, checkpointed = run()
    assert all(isinstance(layer, CheckpointWrapper) for layer in backbone.transformer_layers)
    torch.testing.assert_close(checkpointed_input_grad, input_grad, rtol=0, atol=1e-6)
    for grad, expected in zip(checkpointed, grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        leaf = embeds.clone().requires_grad_()
        hidden = backbone.llm.model(inputs_embeds=leaf, attention_mask=mask).last_hidden_state
    hidden.float()[PADDING].sum().backward()
    with torch.no_grad():
        full_precision = backbone.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert torch.isfinite(hidden).all() and torch.isfinite(leaf.grad).all()
    assert (hidden.float() - full_precision)[PADDING].abs().max() < 0.25  # bf16 rounding through 2 layers


def test_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        bidirectional_mask(PADDING, torch.float32, "flash_attention_2")
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        block_causal_pattern(torch.ones(3, 6), PADDING)
    with pytest.raises(ValueError, match="square"):
        attention_mask_from_pattern(torch.ones(1, 2, 3, dtype=torch.bool))
