"""π0 as a policy model: PaliGemma (SigLIP + linear projector + Gemma, a Prismatic VLM built from the registry) plus
a Gemma action expert sharing attention layer by layer (`joint.py`), trained with flow matching (`flow.py`).

Shapes: B batch, C cameras, S image size, T instruction tokens (<= 48), H chunk (50), A padded action / state dim
(32), D_v VLM width, D_e expert width. Prefix: every camera's SigLIP patches (final norm) through the projector
(unscaled), then the language embeddings (Gemma's `embed_tokens`, which scales by sqrt(D_v)); an absent camera's
tokens are padding. Suffix: `state_proj(state)` (its own block), then `action_time_mlp_out(swish(action_time_mlp_in(
[action_in_proj(x_t), time_embedding(t)])))` (one bidirectional block). Mask: openpi's cumulative block rule
(`models/attention.py`), positions `cumsum(pad) - 1`. Output: `action_out_proj` on the action tokens' expert states.
The expert's layer i lives in the VLM's layer i (`JointDecoderLayer`: keys `llm_backbone.llm.model.layers.i.expert.*`),
its final norm is `expert_norm`. The expert's layers are part of the LLM backbone, as both experts are openpi's `llm`:
they train when the stage trains the LLM and get LoRA adapters with it (the suffix projections and `expert_norm`
train in every stage). Facts: docs/pi0_facts.md.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRMSNorm

from vla_train.config.policy import PI0_MAX_DIM
from vla_train.models.attention import attend_to_self_when_empty, block_causal_pattern
from vla_train.models.chunk_vlm import ChunkOutput, fresh_generator
from vla_train.models.llm import LLMBackbone
from vla_train.models.pi0.flow import euler_sample, flow_loss_sum, time_embedding, training_sample
from vla_train.models.pi0.joint import KV, JointDecoderLayer, check_shared_geometry, joint_forward
from vla_train.models.policy_vlm import HEAD_INIT_SEED, PolicyVLM
from vla_train.models.vision import VisionBackbone

PADDED_DIM = PI0_MAX_DIM  # state and actions are zero-padded to 32 dimensions (openpi)
EXPERT_SIZES = {"gemma-300m": (1024, 4096), "tiny": (32, 64)}  # the action expert's (width, MLP size)
Prefix = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # embeddings [B, L, D_v], pad [B, L], ar [B, L]


def expert_config(vlm_config: GemmaConfig, expert: str) -> GemmaConfig:
    """The action expert's Gemma config: the VLM's attention geometry (depth, heads, KV heads, head dim, RoPE) with
    the expert's width and MLP size (`EXPERT_SIZES`)."""
    if expert not in EXPERT_SIZES:
        raise ValueError(f"Unknown π0 action expert {expert!r}; choose one of {sorted(EXPERT_SIZES)}.")
    width, mlp = EXPERT_SIZES[expert]
    values = {**vlm_config.to_dict(), "hidden_size": width, "intermediate_size": mlp}
    values.pop("model_type", None)
    return GemmaConfig(**values)


def pad_to(x: torch.Tensor, dim: int = PADDED_DIM) -> torch.Tensor:
    """Zero-pad the last dimension to `dim` (openpi's `pad_to_dim`)."""
    if x.shape[-1] > dim:
        raise ValueError(f"π0 reads at most {dim} action / state dimensions, got {x.shape[-1]}.")
    return F.pad(x, (0, dim - x.shape[-1]))


class Pi0VLM(PolicyVLM):
    """The π0 network (module docstring); `forward` returns the flow-matching loss, `sample_actions` the chunk."""

    root_casts_forward_inputs = False  # FSDP's root keeps the actions and state FP32 (the flow target, the time)
    new_module_keys = ("expert_norm", "state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out",
                       "action_out_proj")

    def __init__(self, model_id: str, vision_backbone: VisionBackbone, llm_backbone: LLMBackbone, *, action_dim: int,
                 chunk_length: int, proprio_dim: int | None = None, expert: str = "gemma-300m",
                 num_cameras: int = 2, max_token_len: int = 48, num_inference_steps: int = 10,
                 arch_specifier: str = "linear",
                 enable_mixed_precision_training: bool = True, init_seed: int = HEAD_INIT_SEED) -> None:
        super().__init__(model_id, vision_backbone, llm_backbone, action_dim=action_dim, chunk_length=chunk_length,
                         proprio_dim=proprio_dim, arch_specifier=arch_specifier,
                         enable_mixed_precision_training=enable_mixed_precision_training, init_seed=init_seed)
        config = llm_backbone.llm.config
        if config.model_type != "gemma":
            raise ValueError(f"π0 runs a Gemma VLM beside its Gemma action expert; {llm_backbone.identifier!r} is a "
                             f"{config.model_type!r} model. Fix: use a PaliGemma base (e.g. pi0-paligemma-224px).")
        for name, value in (("action_dim", action_dim), ("proprio_dim", proprio_dim or 0)):
            if value > PADDED_DIM:
                raise ValueError(f"π0 pads actions and state to {PADDED_DIM} dimensions; {name}={value} is larger.")
        self.expert, self.expert_config = expert, expert_config(config, expert)
        self.num_cameras, self.max_token_len, self.num_inference_steps = num_cameras, max_token_len, num_inference_steps
        check_shared_geometry(config, self.expert_config)
        self._add_new_modules()

    # --- the family's new modules -------------------------------------------------------------------------------
    def _new_modules(self) -> dict[str, nn.Module]:
        width = self.expert_config.hidden_size
        return {"expert_norm": GemmaRMSNorm(width, eps=self.expert_config.rms_norm_eps),
                "state_proj": nn.Linear(PADDED_DIM, width), "action_in_proj": nn.Linear(PADDED_DIM, width),
                "action_time_mlp_in": nn.Linear(2 * width, width), "action_time_mlp_out": nn.Linear(width, width),
                "action_out_proj": nn.Linear(width, PADDED_DIM)}

    def _expert_layers(self) -> list[GemmaDecoderLayer]:
        return [GemmaDecoderLayer(self.expert_config, index) for index in range(self.expert_config.num_hidden_layers)]

    def _seeded_extras(self) -> None:
        """The expert's layers, each joined to the VLM's layer of the same index (`JointDecoderLayer`)."""
        layers = self.llm_backbone.llm.model.layers
        for index, expert_layer in enumerate(self._expert_layers()):
            layers[index] = JointDecoderLayer(layers[index], expert_layer)

    def _extra_added_state(self) -> dict[str, torch.Tensor]:
        return {f"llm_backbone.llm.model.layers.{index}.expert.{name}": tensor
                for index, layer in enumerate(self._expert_layers()) for name, tensor in layer.state_dict().items()}

    def unused_parameters(self) -> list[nn.Parameter]:
        """What only the prefix's outputs after the last layer would read, which nothing reads (the suffix uses each
        layer's prefix keys and values): the last VLM layer's `o_proj`, post-attention norm and MLP, and the VLM's
        final norm (openpi computes them and their gradient is zero; here they stay frozen, so no optimizer state waits
        for a gradient that never comes). The last layer's prefix queries get an all-zero gradient through the joint
        attention, so `q_proj` stays trainable, as in openpi."""
        model = self.llm_backbone.llm.model
        last = model.layers[-1]
        modules = (last.self_attn.o_proj, last.post_attention_layernorm, last.mlp, model.norm)
        return [*super().unused_parameters(), *(p for module in modules for p in module.parameters())]

    # --- the network --------------------------------------------------------------------------------------------
    @property
    def num_extra_prefix_tokens(self) -> int:
        return 0

    def embed_prefix(self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor,
                     token_mask: torch.Tensor) -> Prefix:
        """`images [B, C, 3, S, S]`, `image_masks [B, C]`, `tokens`/`token_mask [B, T]` -> `(embeddings
        [B, C*P + T, D_v], pad [B, L], ar [B, L] zeros)`."""
        batch, cameras = images.shape[:2]
        with torch.set_grad_enabled(self.vision_backbone_requires_grad and torch.is_grad_enabled()):
            patches = self.vision_backbone(images.flatten(0, 1))  # [B*C, P, d]
        image_embeddings = self.projector(patches).unflatten(0, (batch, cameras)).flatten(1, 2)
        language = self.llm_backbone.embed_input_ids(tokens)  # Gemma's embedding scales by sqrt(D_v)
        pad = torch.cat([image_masks.bool().repeat_interleave(patches.shape[1], dim=1), token_mask.bool()], dim=1)
        embeddings = torch.cat([image_embeddings.to(language.dtype), language], dim=1)
        return embeddings, pad, torch.zeros_like(pad, dtype=torch.long)

    def embed_suffix(self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Prefix:
        """`state [B, A]`, noisy actions `x_t [B, H, A]`, time `t [B]` -> `(embeddings [B, 1 + H, D_e], pad, ar)`
        with `ar = [1, 1, 0, ..., 0]` (the state its own block, the actions one block)."""
        dtype = self.state_proj.weight.dtype
        state_token = self.state_proj(state.to(dtype))[:, None]
        actions = self.action_in_proj(x_t.to(dtype))
        # the embedding from FP32 times: a bf16 t would shift the 4e-3 period's phase by radians
        times = time_embedding(t.float(), actions.shape[-1]).to(dtype)[:, None].expand_as(actions)
        hidden = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, times], dim=-1))))
        embeddings = torch.cat([state_token, hidden], dim=1)
        batch, length = embeddings.shape[:2]
        ar = torch.zeros(batch, length, dtype=torch.long, device=embeddings.device)
        ar[:, :2] = 1
        return embeddings, torch.ones(batch, length, dtype=torch.bool, device=embeddings.device), ar

    def velocity(self, prefix: Prefix, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 cache: list[KV] | None = None) -> torch.Tensor:
        """The predicted velocity `[B, H, A]` at `(x_t, t)`: one joint pass over `prefix` and the suffix, or, with the
        prefix's `cache`, the suffix alone against it."""
        prefix_embeddings, prefix_pad, prefix_ar = prefix
        suffix, suffix_pad, suffix_ar = self.embed_suffix(state, x_t, t)
        pattern, positions = _attention(torch.cat([prefix_pad, suffix_pad], 1), torch.cat([prefix_ar, suffix_ar], 1))
        model = self.llm_backbone.llm.model
        if cache is None:
            _, out, _ = joint_forward(model, self.expert_norm, prefix_embeddings, suffix, pattern[:, None], positions)
        else:
            start = prefix_pad.shape[1]
            _, out, _ = joint_forward(model, self.expert_norm, None, suffix, pattern[:, None, start:],
                                      positions[:, start:], past=cache)
        return self.action_out_proj(out[:, -self.chunk_length:].to(self.action_out_proj.weight.dtype))

    def forward(self, pixel_values: torch.Tensor, image_mask: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, proprio: torch.Tensor | None, actions: torch.Tensor,
                action_mask: torch.Tensor | None = None, normalizer: float | None = None,
                generator: torch.Generator | None = None, **_: Any) -> ChunkOutput:
        """Flow-matching loss over valid steps and the first `action_dim` dimensions: `pixel_values [B, C, 3, S, S]`,
        `image_mask [B, C]`, `input_ids`/`attention_mask [B, T]`, normalized `proprio [B, Q]` (None: zeros),
        normalized `actions [B, H, A]`, `action_mask [B, H]`. Time and noise come from `generator` (default: one
        seeded from the global RNG). `loss` = summed squared error / (`normalizer` or the element count)."""
        target = pad_to(actions.float())
        sample = training_sample(target, generator or fresh_generator(actions.device))
        prefix = self.embed_prefix(pixel_values, image_mask, input_ids, attention_mask)
        predicted = self.velocity(prefix, self.padded_state(proprio, actions.shape[0], actions.device),
                                  sample["x_t"], sample["time"])
        loss_sum, count = flow_loss_sum(predicted, sample["target"], action_mask, self.action_dim)
        # the one-step estimate of the clean chunk x_0 = x_t - t * v, for the L1 metric
        estimate = sample["x_t"] - sample["time"][:, None, None] * predicted.float()
        return ChunkOutput(loss=loss_sum / (normalizer or count), loss_sum=loss_sum, count=count,
                           predicted_actions=estimate[..., :self.action_dim].detach())

    def padded_state(self, proprio: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Normalized proprio `[B, Q]` -> `[B, 32]` (zeros without proprio)."""
        if proprio is None:
            return torch.zeros(batch, PADDED_DIM, device=device)
        return pad_to(proprio.float())

    @torch.no_grad()
    def sample_actions(self, pixel_values: torch.Tensor, image_mask: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, proprio: torch.Tensor | None, generator: torch.Generator,
                       num_steps: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """The normalized chunk `[B, H, action_dim]` by `num_steps` (default: the config's) Euler steps from noise;
        the prefix runs once and fills a KV cache (`use_cache=False`: every step runs the whole sequence)."""
        prefix = self.embed_prefix(pixel_values, image_mask, input_ids, attention_mask)
        state = self.padded_state(proprio, input_ids.shape[0], input_ids.device)
        cache = None
        if use_cache:
            pattern, positions = _attention(prefix[1], prefix[2])
            _, _, cache = joint_forward(self.llm_backbone.llm.model, self.expert_norm, prefix[0], None,
                                        pattern[:, None], positions, use_cache=True)
        noise = torch.randn((input_ids.shape[0], self.chunk_length, PADDED_DIM), generator=generator,
                            device=generator.device).to(input_ids.device)
        chunk = euler_sample(lambda x, t: self.velocity(prefix, state, x, t, cache).float(), noise,
                             num_steps or self.num_inference_steps)
        return chunk[..., :self.action_dim]

    def predict_action(self, images: Any, instruction: str, proprio: Any = None, unnorm_key: str | None = None,
                       num_inference_steps: int | None = None, seed: int = 0) -> Any:
        """Camera images (PIL, one per camera), instruction, raw proprio -> un-normalized `[H, A]` numpy actions."""
        from vla_train.models.pi0.predict import predict_action  # lazy: it imports this module

        return predict_action(self, images, instruction, proprio, unnorm_key, num_inference_steps, seed)


def _attention(pad: torch.Tensor, ar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """openpi's block pattern `[B, L, L]` (rows without any allowed key attend to themselves: padding) and the
    positions `cumsum(pad) - 1` `[B, L]`."""
    return attend_to_self_when_empty(block_causal_pattern(ar, pad)), pad.long().cumsum(1) - 1
