"""π0's shared attention (`vla_train/models/pi0/joint.py`): with identical experts it is one Gemma over the
concatenated sequence under the block mask; with different widths it equals an explicit masked-softmax computation;
a cached prefix then the suffix alone equals the joint pass; the joint layers keep the VLM's state-dict keys."""

import math

import pytest
import torch
from torch import nn
from transformers import GemmaConfig, GemmaModel
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRMSNorm

from vla_train.models.attention import attend_to_self_when_empty, block_causal_pattern
from vla_train.models.pi0.joint import JointDecoderLayer, check_shared_geometry, joint_forward

B, PREFIX, SUFFIX = 2, 7, 4


def _config(width: int, mlp: int, kv_heads: int = 1) -> GemmaConfig:
    return GemmaConfig(vocab_size=64, hidden_size=width, intermediate_size=mlp, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, rms_norm_eps=1e-6,
                       hidden_activation="gelu_pytorch_tanh", attn_implementation="eager")


class JointGemma(nn.Module):
    """A VLM `GemmaModel` whose layers are joined to an expert's (as `Pi0VLM` holds them) and the expert's norm."""

    def __init__(self, vlm_config: GemmaConfig, expert_config: GemmaConfig) -> None:
        super().__init__()
        check_shared_geometry(vlm_config, expert_config)
        self.vlm = GemmaModel(vlm_config)
        self.expert_layers = [GemmaDecoderLayer(expert_config, i) for i in range(expert_config.num_hidden_layers)]
        for index, layer in enumerate(self.expert_layers):
            self.vlm.layers[index] = JointDecoderLayer(self.vlm.layers[index], layer)
        self.expert_norm = GemmaRMSNorm(expert_config.hidden_size, eps=1e-6)

    def forward(self, prefix, suffix, mask, positions, past=None, use_cache=False):
        return joint_forward(self.vlm, self.expert_norm, prefix, suffix, mask, positions, past, use_cache)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (Gemma's RMSNorm weights start at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _layout() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """π0's masks for a prefix (row 1 with 2 padded tokens) and a suffix (state token, then actions): the boolean
    pattern `[B, L, L]`, the positions `cumsum(pad) - 1` and the padding."""
    pad = torch.ones(B, PREFIX + SUFFIX, dtype=torch.bool)
    pad[1, PREFIX - 2:PREFIX] = False
    ar = torch.zeros(B, PREFIX + SUFFIX, dtype=torch.long)
    ar[:, PREFIX] = ar[:, PREFIX + 1] = 1  # the state its own block, then the actions one block
    return attend_to_self_when_empty(block_causal_pattern(ar, pad)), pad.long().cumsum(1) - 1, pad


def _embeddings(width_prefix: int, width_suffix: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (torch.randn(B, PREFIX, width_prefix, generator=generator),
            torch.randn(B, SUFFIX, width_suffix, generator=generator))


def test_identical_experts_equal_one_gemma_over_the_concatenation():
    joint = JointGemma(_config(32, 64), _config(32, 64)).eval()
    _randomize(joint, 0)
    vlm_state = {k: v for k, v in joint.vlm.state_dict().items() if ".expert." not in k}
    for index, layer in enumerate(joint.expert_layers):
        layer.load_state_dict({k.removeprefix(f"layers.{index}."): v for k, v in vlm_state.items()
                               if k.startswith(f"layers.{index}.")})
    joint.expert_norm.load_state_dict(joint.vlm.norm.state_dict())
    pattern, positions, _ = _layout()
    prefix, suffix = _embeddings(32, 32)
    prefix_out, suffix_out, _ = joint(prefix, suffix, pattern[:, None], positions)
    single = GemmaModel(_config(32, 64)).eval()
    single.load_state_dict(vlm_state)  # the joint layers keep the VLM layers' keys
    additive = torch.zeros(pattern.shape).masked_fill(~pattern, torch.finfo(torch.float32).min)[:, None]
    expected = single(inputs_embeds=torch.cat([prefix, suffix], 1), attention_mask=additive,
                      position_ids=positions).last_hidden_state
    torch.testing.assert_close(torch.cat([prefix_out, suffix_out], 1), expected, rtol=1e-5, atol=1e-5)


def _project(layers, normed, name: str, count: int) -> torch.Tensor:
    """Each expert's projection `name` of its normed tokens, as heads, concatenated along the sequence."""
    parts = [getattr(layer.self_attn, name)(h) for layer, h in zip(layers, normed, strict=True)]
    return torch.cat([p.view(B, p.shape[1], count, 16).transpose(1, 2) for p in parts], 2)


def _reference(joint: JointGemma, prefix, suffix, pattern, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint layer written out: per-expert norms and projections, one masked softmax in float64."""
    def rms(norm, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight.double())

    def rope(x):  # [B, heads, L, d], rotate-half over [freqs, freqs]
        d = x.shape[-1]
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = positions.double()[:, None, :, None] * torch.cat([inv, inv])
        rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * angles.cos() + rotated * angles.sin()

    hidden = [prefix.double(), suffix.double()]
    for vlm_layer, expert_layer in zip(joint.vlm.layers, joint.expert_layers, strict=True):
        layers = (vlm_layer.double(), expert_layer.double())
        normed = [rms(layer.input_layernorm, x) for layer, x in zip(layers, hidden, strict=True)]
        q, k, v = (_project(layers, normed, name, count) for name, count in (("q_proj", 4), ("k_proj", 1),
                                                                             ("v_proj", 1)))
        scores = rope(q) @ rope(k).transpose(-2, -1) / math.sqrt(16)  # one KV head shared by the 4 query heads
        weights = torch.softmax(scores.masked_fill(~pattern[:, None], float("-inf")), -1)
        out = (weights @ v).transpose(1, 2).reshape(B, PREFIX + SUFFIX, -1)
        parts = (out[:, :PREFIX], out[:, PREFIX:])
        new = []
        for layer, x, part in zip(layers, hidden, parts, strict=True):
            x = x + layer.self_attn.o_proj(part)
            new.append(x + layer.mlp(rms(layer.post_attention_layernorm, x)))
        hidden = new
    joint.float()
    return (rms(joint.vlm.norm.double(), hidden[0]).float(), rms(joint.expert_norm.double(), hidden[1]).float())


def _different_widths(seed: int) -> JointGemma:
    """A VLM of width 32 beside an expert of width 24, random weights."""
    joint = JointGemma(_config(32, 64), _config(24, 48)).eval()
    _randomize(joint, seed)
    return joint


def test_experts_of_different_widths_equal_the_explicit_computation():
    joint = _different_widths(1)
    pattern, positions, pad = _layout()
    prefix, suffix = _embeddings(32, 24)
    prefix_out, suffix_out, _ = joint(prefix, suffix, pattern[:, None], positions)
    expected_prefix, expected_suffix = _reference(joint, prefix, suffix, pattern, positions)
    torch.testing.assert_close(suffix_out, expected_suffix, rtol=1e-4, atol=1e-4)
    real = pad[:, :PREFIX]  # padded prefix rows attend to themselves only: their outputs are padding
    torch.testing.assert_close(prefix_out[real], expected_prefix[real], rtol=1e-4, atol=1e-4)


def test_a_cached_prefix_then_the_suffix_alone_equals_the_joint_pass():
    joint = _different_widths(2)
    pattern, positions, _ = _layout()
    prefix, suffix = _embeddings(32, 24)
    _, full_suffix, _ = joint(prefix, suffix, pattern[:, None], positions)
    _, _, cache = joint(prefix, None, pattern[:, None, :PREFIX, :PREFIX], positions[:, :PREFIX], use_cache=True)
    assert len(cache) == 2 and cache[0][0].shape == (B, 1, PREFIX, 16)
    _, cached_suffix, _ = joint(None, suffix, pattern[:, None, PREFIX:], positions[:, PREFIX:], past=cache)
    torch.testing.assert_close(cached_suffix, full_suffix, rtol=1e-5, atol=1e-5)


def test_experts_must_share_the_attention_geometry():
    with pytest.raises(ValueError, match="num_key_value_heads 1 vs 2"):
        JointGemma(_config(32, 64), _config(32, 64, kv_heads=2))
