"""OpenVLA-OFT: a PrismaticVLM whose LLM reads a chunk's H*A action slots bidirectionally and regresses the actions.

Shapes: B batch, T text length, C cameras, P patches per camera, D LLM width, H chunk length, A action dim, Q proprio
dim. The processor gives `input_ids [B, T]` = prompt prefix (BOS first) + the chunk's H*A action ids + stop ids, right
padded, and `labels` = -100 except on the action and stop ids. The LLM input is
`[emb(BOS), patches [C*P], proprio token (if proprio), diffusion timestep token (diffusion only), emb(text[1:])]`.
The action slots are the first H*A supervised positions of each row; their input embeddings are zeros (L1 head) or the
projected noisy actions (diffusion head). Attention is bidirectional over the real tokens. The head reads the final
hidden state one position before each slot (OFT's `last_hidden[:, num_prefix:-1]` under `labels[:, 1:]`),
`[B, H*A, D]`, and predicts normalized actions `[B, H, A]` (L1) or the noise (diffusion).
"""

import re

import torch
from torch import nn

from vla_train.models.chunk_vlm import Cameras, ChunkOutput, ChunkVLM, fresh_generator
from vla_train.models.llm import IGNORE_INDEX, LLMBackbone
from vla_train.models.oft.film import FiLMedVisionBackbone, apply_film
from vla_train.models.oft.heads import (
    DiffusionActionHead,
    L1RegressionActionHead,
    MLPResNet,
    NoisyActionProjector,
    ProprioProjector,
    masked_error_sum,
)
from vla_train.models.policy_vlm import HEAD_INIT_SEED
from vla_train.models.vision import VisionBackbone

HEADS = ("l1", "diffusion")
NEW_MODULE_KEYS = ("action_head", "noisy_action_projector", "proprio_projector")
_FILM_BLOCK = re.compile(r"\.blocks\.(\d+)\.block\.")


class OFTVLM(ChunkVLM):
    """PrismaticVLM + `action_head` (+ `proprio_projector`, + `noisy_action_projector` for diffusion), OFT's names."""

    new_module_keys = NEW_MODULE_KEYS

    def __init__(self, model_id: str, vision_backbone: VisionBackbone, llm_backbone: LLMBackbone, *, action_dim: int,
                 chunk_length: int, proprio_dim: int | None = None, head: str = "l1",
                 head_hidden_dim: int | None = None, film: bool = False, num_diffusion_steps_inference: int = 50,
                 arch_specifier: str = "gelu-mlp",
                 enable_mixed_precision_training: bool = True, init_seed: int = HEAD_INIT_SEED) -> None:
        super().__init__(model_id, vision_backbone, llm_backbone, action_dim=action_dim, chunk_length=chunk_length,
                         proprio_dim=proprio_dim, arch_specifier=arch_specifier,
                         enable_mixed_precision_training=enable_mixed_precision_training, init_seed=init_seed)
        if head not in HEADS:
            raise ValueError(f"Unknown OFT head {head!r}; choose one of {HEADS}.")
        llm_dim = llm_backbone.embed_dim
        hidden_dim = head_hidden_dim or llm_dim
        if head == "diffusion" and hidden_dim != llm_dim:
            raise ValueError(f"The diffusion timestep token has the head's width: head_hidden_dim must be {llm_dim}.")
        self.head_type, self.head_hidden_dim, self.film = head, hidden_dim, film
        self.num_diffusion_steps_inference = num_diffusion_steps_inference
        self._add_new_modules()

    def _new_modules(self) -> dict[str, nn.Module]:
        """The modules OFT adds to the VLM, built in a fixed order on the current default device (the caller seeds)."""
        llm_dim = self.llm_backbone.embed_dim
        modules: dict[str, nn.Module] = {}
        if self.head_type == "l1":
            modules["action_head"] = L1RegressionActionHead(llm_dim, self.head_hidden_dim, self.action_dim)
        else:
            modules["action_head"] = DiffusionActionHead(
                llm_dim, self.head_hidden_dim, self.action_dim,
                num_diffusion_steps_inference=self.num_diffusion_steps_inference)
            modules["noisy_action_projector"] = NoisyActionProjector(llm_dim)
        if self.proprio_dim:
            modules["proprio_projector"] = ProprioProjector(llm_dim, self.proprio_dim)
        return modules

    def _seeded_extras(self) -> None:
        if self.film:
            apply_film(self.vision_backbone, self.llm_backbone.embed_dim)

    @property
    def has_film(self) -> bool:
        return isinstance(self.vision_backbone, FiLMedVisionBackbone)

    def _extra_added_state(self) -> dict[str, torch.Tensor]:
        """FiLM's scale / shift projections, drawn as `apply_film` draws them (FiLMedBlock's order: scale, shift)."""
        state: dict[str, torch.Tensor] = {}
        if not self.has_film:
            return state
        names = {id(module): name for name, module in self.vision_backbone.named_modules()}
        for featurizer in self.vision_backbone.featurizers:
            for block in featurizer.blocks:
                prefix = f"vision_backbone.{names[id(block)]}"
                for part in ("scale", "shift"):
                    linear = nn.Linear(self.llm_backbone.embed_dim, featurizer.embed_dim)
                    state.update({f"{prefix}.{part}.{k}": v for k, v in linear.state_dict().items()})
        return state

    def base_checkpoint_key(self, key: str) -> str:
        """Where a plain Prismatic checkpoint holds our state-dict `key` (FiLM moves each timm block to `.block`)."""
        key = super().base_checkpoint_key(key)  # LoRA's base_layer
        if self.has_film and key.startswith("vision_backbone."):
            return _FILM_BLOCK.sub(r".blocks.\1.", key)
        return key

    def always_trainable(self) -> list[nn.Parameter]:
        """Parameters that train in every stage: the heads and projectors, and the FiLM projections of the blocks the
        forward runs (OFT trains them with the rest of the policy)."""
        params = super().always_trainable()
        if self.has_film:
            unused = {id(p) for module in self.vision_backbone.unused_modules() for p in module.parameters()}
            params += [p for p in self.vision_backbone.film_parameters() if id(p) not in unused]
        return params

    @property
    def num_extra_prefix_tokens(self) -> int:
        """The proprio token (with a proprio projector) and the diffusion timestep token (diffusion head)."""
        return int(self.proprio_projector is not None) + int(self.head_type == "diffusion")

    def fsdp_unit_classes(self) -> tuple[type[nn.Module], ...]:
        """The VLM's units plus the heads' `MLPResNet` (called through `forward`, so FSDP hooks fire)."""
        return (*super().fsdp_unit_classes(), MLPResNet)

    # --- sequence layout ----------------------------------------------------------------------------------------
    def language_condition(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                           labels: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """FiLM's condition inputs: the LLM input embeddings `[B, T, D]` and the prompt mask `[B, T]` (real tokens
        that are not supervised: BOS and the instruction prompt; OFT averages its non-action embeddings); None
        without FiLM."""
        if not self.has_film:
            return None
        prompt = labels == IGNORE_INDEX
        if attention_mask is not None:
            prompt = prompt & attention_mask.bool()
        return self.llm_backbone.embed_input_ids(input_ids), prompt

    def action_hidden_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                             patches: torch.Tensor, slots: torch.Tensor, proprio: torch.Tensor | None = None,
                             slot_embeddings: torch.Tensor | None = None,
                             timestep_token: torch.Tensor | None = None) -> torch.Tensor:
        """Run the LLM bidirectionally over `[BOS, patches [B, C*P, D], proprio, timestep [B, 1, D], text[1:]]`,
        the slot inputs zeroed (or `slot_embeddings [B, H*A, D]`); returns the hidden states one position before
        each slot, `[B, H*A, D]`."""
        embeddings = self.llm_backbone.embed_input_ids(input_ids)  # [B, T, D]
        batch, dtype = embeddings.shape[0], embeddings.dtype
        prefix = [patches.to(dtype)]
        proprio_token = self.proprio_features(proprio)  # [B, 1, D] or None
        if proprio_token is not None:
            prefix.append(proprio_token)
        if timestep_token is not None:
            prefix.append(timestep_token)
        prefix_embeddings = torch.cat([p.to(dtype) for p in prefix], dim=1)  # [B, N, D]
        num_prefix = prefix_embeddings.shape[1]
        if slot_embeddings is None:
            text = embeddings.masked_fill(slots[..., None], 0.0)
        else:
            text = embeddings.masked_scatter(slots[..., None], slot_embeddings.to(dtype))
        hidden = self.bidirectional_llm(text, prefix_embeddings, attention_mask)  # [B, T + N, D]
        rows, positions = slots.nonzero(as_tuple=True)  # row-major: slot k of row b at b * H*A + k
        return hidden[rows, positions + num_prefix - 1].reshape(batch, self.num_action_slots, -1)

    # --- training -----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, pixel_values: Cameras,
                labels: torch.LongTensor, actions: torch.Tensor | None = None, action_mask: torch.Tensor | None = None,
                proprio: torch.Tensor | None = None, normalizer: torch.Tensor | float | None = None,
                generator: torch.Generator | None = None, check_slots: bool = True,
                sample_steps: int | None = None) -> ChunkOutput:
        """Actions `[B, H, A]` (normalized), `action_mask [B, H]` (True = valid step), `proprio [B, Q]`. L1 head:
        loss = sum |pred - actions| over valid elements / `normalizer` (default: this batch's count = mean).
        Diffusion head: the same with squared noise error; noise and timesteps come from `generator`.
        `check_slots=False` skips the host-syncing label check (`check_action_slots` on the CPU batch instead).
        `sample_steps` (diffusion head): also sample the chunk with that many DDIM steps into `predicted_actions`
        (evaluation's L1; inside `forward`, so FSDP gathers the root's parameters)."""
        slots = self.action_slot_mask(labels, check=check_slots)
        patches = self.patch_embeddings(pixel_values, self.language_condition(input_ids, attention_mask, labels))
        if self.head_type == "l1":
            hidden = self.action_hidden_states(input_ids, attention_mask, patches, slots, proprio)
            predicted = self.action_head.predict_action(hidden)  # [B, H, A]
            if actions is None:
                return ChunkOutput(predicted_actions=predicted)
            loss_sum, count = masked_error_sum((predicted - actions.to(predicted.dtype)).abs(), action_mask)
            noise_pred = None
        else:
            if actions is None:
                raise ValueError("The diffusion head's forward needs actions (use predict_action_chunk to sample).")
            if action_mask is not None:  # padded steps may hold NaN: they would reach every token bidirectionally
                actions = torch.where(action_mask[..., None].bool(), actions, torch.zeros_like(actions))
            generator = generator if generator is not None else fresh_generator(input_ids.device)
            noisy = self.action_head.sample_noisy_actions(actions, generator)
            hidden = self.action_hidden_states(input_ids, attention_mask, patches, slots, proprio,
                                               self.noisy_action_projector(noisy["noisy_actions"]),
                                               noisy["diffusion_timestep_embeddings"])
            noise_pred = self.action_head.predict_noise(hidden)
            loss_sum, count = DiffusionActionHead.loss_sum(noise_pred, noisy["noise"], action_mask)
            predicted = None if not sample_steps else self.predict_action_chunk(
                input_ids, attention_mask, pixel_values, proprio, labels=labels, generator=generator,
                num_inference_steps=sample_steps)
        loss = loss_sum / (normalizer if normalizer is not None else count.clamp(min=1))
        return ChunkOutput(loss=loss, predicted_actions=predicted, loss_sum=loss_sum, count=count,
                         predicted_noise=noise_pred)

    # --- inference ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                             pixel_values: Cameras, proprio: torch.Tensor | None = None,
                             labels: torch.LongTensor | None = None, generator: torch.Generator | None = None,
                             num_inference_steps: int | None = None) -> torch.Tensor:
        """Normalized actions `[B, H, A]` in one forward (L1) or a DDIM loop (diffusion). Without `labels`,
        `input_ids` are right-padded prompt prefixes and the slots + stop ids are appended (`append_action_slots`);
        with `labels`, `input_ids` already hold the training layout (action ids are ignored)."""
        if labels is None:
            input_ids, attention_mask, labels = self.append_action_slots(input_ids, attention_mask)
        slots = self.action_slot_mask(labels)
        patches = self.patch_embeddings(pixel_values, self.language_condition(input_ids, attention_mask, labels))
        if self.head_type == "l1":
            hidden = self.action_hidden_states(input_ids, attention_mask, patches, slots, proprio)
            return self.action_head.predict_action(hidden)

        def noise_fn(noisy: torch.Tensor, timestep_token: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            hidden = self.action_hidden_states(input_ids, attention_mask, patches, slots, proprio,
                                               self.noisy_action_projector(noisy), timestep_token)
            return self.action_head.predict_noise(hidden)

        generator = generator if generator is not None else fresh_generator(input_ids.device)
        dtype = self.llm_backbone.llm.get_input_embeddings().weight.dtype
        shape = (input_ids.shape[0], self.chunk_length, self.action_dim)
        return self.action_head.sample_actions(noise_fn, shape, generator, num_inference_steps,
                                               device=input_ids.device, dtype=dtype)

