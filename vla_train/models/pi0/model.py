"""π0: SigLIP + PaliGemma's Gemma (the prefix: images, then the instruction) and a Gemma action expert (the suffix:
the state token, then H noisy action tokens) sharing attention (`joint.py`), trained with flow matching (`flow.py`).

Shapes: B batch, C cameras, S image size, T instruction tokens (48), H chunk (50), A padded action / state dim (32),
D_v VLM width, D_e expert width. Prefix: every camera's SigLIP patches through `multi_modal_projector.linear`
(unscaled), then the language embeddings (Gemma's `embed_tokens`, times sqrt(D_v)); an absent camera's tokens are
padding. Suffix: `state_proj(state)` (its own block), then `action_time_mlp_out(swish(action_time_mlp_in([
action_in_proj(x_t), time_embedding(t)])))` (one bidirectional block). Mask: openpi's cumulative block rule
(`models/attention.py`), positions `cumsum(pad) - 1`. Output: `action_out_proj` on the action tokens' expert states.
Facts: docs/pi0_facts.md.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GemmaConfig, SiglipVisionConfig, SiglipVisionModel

from vla_train.models.attention import attend_to_self_when_empty, block_causal_pattern
from vla_train.models.pi0.flow import euler_sample, flow_loss_sum, time_embedding, training_sample
from vla_train.models.pi0.joint import KV, JointGemma

PADDED_DIM = 32  # state and actions are zero-padded to 32 dimensions (openpi)


@dataclass(frozen=True)
class Pi0Architecture:
    """The three towers' configs and the chunk length (no weights)."""

    vision: SiglipVisionConfig
    vlm: GemmaConfig
    expert: GemmaConfig
    chunk_length: int = 50


def _gemma(width: int, depth: int, mlp: int, heads: int, head_dim: int, vocab: int) -> GemmaConfig:
    return GemmaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                       num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim, rms_norm_eps=1e-6,
                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                       attn_implementation="sdpa")


def pi0_architecture(size: str = "full") -> Pi0Architecture:
    """`full`: SigLIP So400m/14 at 224 px + Gemma 2B + Gemma 300M (about 3.3 B parameters); `tiny`: the same shape
    at test size (32 px images, 2 layers)."""
    if size == "full":
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                    num_attention_heads=16, patch_size=14, image_size=224, vision_use_head=False)
        return Pi0Architecture(vision, _gemma(2048, 18, 16384, 8, 256, 257152), _gemma(1024, 18, 4096, 8, 256, 257152))
    if size == "tiny":
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    patch_size=8, image_size=32, vision_use_head=False)
        return Pi0Architecture(vision, _gemma(48, 2, 96, 4, 16, 300), _gemma(32, 2, 64, 4, 16, 300), chunk_length=6)
    raise ValueError(f"Unknown π0 size {size!r}; choose 'full' or 'tiny'.")


class MultiModalProjector(nn.Module):
    """PaliGemma's projector: one `linear` (SigLIP width -> VLM width), LeRobot's key `multi_modal_projector.linear`."""

    def __init__(self, vision_width: int, vlm_width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_width, vlm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class Pi0Model(nn.Module):
    """The π0 network (module docstring); `forward` returns the flow-matching loss, `sample_actions` the chunk."""

    def __init__(self, architecture: Pi0Architecture) -> None:
        super().__init__()
        self.architecture, self.chunk_length = architecture, architecture.chunk_length
        self.vision_tower = SiglipVisionModel(architecture.vision)
        self.multi_modal_projector = MultiModalProjector(architecture.vision.hidden_size,
                                                         architecture.vlm.hidden_size)
        self.joint = JointGemma(architecture.vlm, architecture.expert)
        width = architecture.expert.hidden_size
        self.state_proj = nn.Linear(PADDED_DIM, width)
        self.action_in_proj = nn.Linear(PADDED_DIM, width)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)
        self.action_out_proj = nn.Linear(width, PADDED_DIM)

    def embed_prefix(self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor,
                     token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`images [B, C, 3, S, S]` (in [-1, 1]), `image_masks [B, C]`, `tokens`/`token_mask [B, T]` ->
        `(embeddings [B, C*P + T, D_v], pad [B, L], ar [B, L] zeros)`."""
        batch, cameras = images.shape[:2]
        patches = self.vision_tower(images.flatten(0, 1)).last_hidden_state  # [B*C, P, d]
        image_embeddings = self.multi_modal_projector(patches).unflatten(0, (batch, cameras)).flatten(1, 2)
        language = self.joint.vlm.embed_tokens(tokens)  # times sqrt(D_v), as Gemma embeds
        per_image = patches.shape[1]
        pad = torch.cat([image_masks.bool().repeat_interleave(per_image, dim=1), token_mask.bool()], dim=1)
        embeddings = torch.cat([image_embeddings.to(language.dtype), language], dim=1)
        return embeddings, pad, torch.zeros_like(pad, dtype=torch.long)

    def embed_suffix(self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`state [B, A]`, noisy actions `x_t [B, H, A]`, time `t [B]` -> `(embeddings [B, 1 + H, D_e], pad, ar)`
        with `ar = [1, 1, 0, ..., 0]` (the state its own block, the actions one block)."""
        dtype = self.state_proj.weight.dtype
        state_token = self.state_proj(state.to(dtype))[:, None]
        actions = self.action_in_proj(x_t.to(dtype))
        times = time_embedding(t.to(dtype), actions.shape[-1])[:, None].expand_as(actions)
        hidden = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, times], dim=-1))))
        embeddings = torch.cat([state_token, hidden], dim=1)
        batch, length = embeddings.shape[:2]
        ar = torch.zeros(batch, length, dtype=torch.long, device=embeddings.device)
        ar[:, :2] = 1
        return embeddings, torch.ones(batch, length, dtype=torch.bool, device=embeddings.device), ar

    def velocity(self, prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor], state: torch.Tensor,
                 x_t: torch.Tensor, t: torch.Tensor, cache: list[KV] | None = None) -> torch.Tensor:
        """The predicted velocity `[B, H, A]` at `(x_t, t)`: one joint pass over `prefix` (its embeddings, pad, ar)
        and the suffix, or, with the prefix's `cache`, the suffix alone against it."""
        prefix_embeddings, prefix_pad, prefix_ar = prefix
        suffix, suffix_pad, suffix_ar = self.embed_suffix(state, x_t, t)
        pad, ar = torch.cat([prefix_pad, suffix_pad], 1), torch.cat([prefix_ar, suffix_ar], 1)
        pattern, positions = _attention(pad, ar)
        if cache is None:
            _, out, _ = self.joint(prefix_embeddings, suffix, pattern[:, None], positions)
        else:
            start = prefix_pad.shape[1]
            _, out, _ = self.joint(None, suffix, pattern[:, None, start:], positions[:, start:], past=cache)
        return self.action_out_proj(out[:, -self.chunk_length:].to(self.action_out_proj.weight.dtype))

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                state: torch.Tensor, actions: torch.Tensor, action_mask: torch.Tensor | None, action_dim: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-matching loss `(sum of squared errors, element count)` over valid steps and the first `action_dim`
        dimensions of the padded actions `[B, H, A]`; time and noise come from `generator`."""
        sample = training_sample(actions, generator)
        prefix = self.embed_prefix(images, image_masks, tokens, token_mask)
        predicted = self.velocity(prefix, state, sample["x_t"], sample["time"])
        return flow_loss_sum(predicted, sample["target"], action_mask, action_dim)

    @torch.no_grad()
    def sample_actions(self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor,
                       token_mask: torch.Tensor, state: torch.Tensor, generator: torch.Generator,
                       num_steps: int = 10, use_cache: bool = True) -> torch.Tensor:
        """The chunk `[B, H, A]` by `num_steps` Euler steps from noise; the prefix runs once and fills a KV cache
        (`use_cache=False`: every step runs the whole sequence, for checks)."""
        prefix = self.embed_prefix(images, image_masks, tokens, token_mask)
        cache = None
        if use_cache:
            pattern, positions = _attention(prefix[1], prefix[2])
            _, _, cache = self.joint(prefix[0], None, pattern[:, None], positions, use_cache=True)
        shape = (state.shape[0], self.chunk_length, PADDED_DIM)
        noise = torch.randn(shape, generator=generator, device=generator.device).to(state.device)
        return euler_sample(lambda x, t: self.velocity(prefix, state, x, t, cache), noise, num_steps)


def _attention(pad: torch.Tensor, ar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """openpi's block pattern `[B, L, L]` (rows without any allowed key attend to themselves: padding) and the
    positions `cumsum(pad) - 1` `[B, L]`."""
    return attend_to_self_when_empty(block_causal_pattern(ar, pad)), pad.long().cumsum(1) - 1
