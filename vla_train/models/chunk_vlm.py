"""`ChunkVLM`: what every action-chunk policy model shares (OpenVLA-OFT's `OFTVLM`, VLA-Adapter's `VLAAdapterVLM`).

Both are a PrismaticVLM whose LLM reads a prompt followed by N placeholder "slots" bidirectionally, plus new modules
(heads, projectors, learned queries) built from a fixed seed so every rank and every reload starts identically.
Shapes: B batch, T text length, C cameras, P patches per camera, D LLM width, H chunk length, A action dim, Q proprio
dim, N = `num_action_slots` (OFT: H*A; VLA-Adapter: its ActionQuery count). The processor gives `input_ids [B, T]` =
prompt prefix (first token first) + N slot ids + the family's stop ids, right padded, with `labels` = -100 except on
the slots and stop ids; the slots are the first N supervised positions of each row.
"""

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import ModelOutput

from vla_train.models.attention import bidirectional_mask
from vla_train.models.llm import IGNORE_INDEX
from vla_train.models.policy_vlm import PolicyVLM

PixelValues = torch.Tensor | dict[str, torch.Tensor]
Cameras = PixelValues | list[PixelValues] | tuple[PixelValues, ...]


@dataclass
class ChunkOutput(ModelOutput):
    """`loss` = `loss_sum / (normalizer or count)` (None without actions); `predicted_actions [B, H, A]` (L1 head),
    `predicted_noise [B, H, A]` (a diffusion head); `loss_sum` (fp32 sum of errors at valid steps), `count` (valid
    elements in this micro-batch)."""

    loss: torch.Tensor | None = None
    predicted_actions: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    count: torch.Tensor | None = None
    predicted_noise: torch.Tensor | None = None


class ChunkVLM(PolicyVLM):
    """A PolicyVLM whose LLM reads N placeholder slots bidirectionally after the prompt (module docstring)."""

    uses_stop_ids: bool = True  # whether the slots are followed by the prompt builder's stop ids

    # --- sequence layout ----------------------------------------------------------------------------------------
    @property
    def num_action_slots(self) -> int:
        """N: placeholder positions after the prompt (OFT: H*A)."""
        return self.chunk_length * self.action_dim

    @property
    def num_extra_prefix_tokens(self) -> int:
        """LLM positions the family inserts after the patches (OFT: proprio and diffusion timestep tokens)."""
        return 0

    def action_slot_mask(self, labels: torch.Tensor, check: bool = True) -> torch.Tensor:
        """`labels [B, T]` -> bool `[B, T]`: the first N supervised positions of each row (the slots). `check` raises
        when a row has fewer (a host sync: the training policy checks its CPU batch instead)."""
        supervised = labels != IGNORE_INDEX
        slots = supervised & (supervised.cumsum(dim=1) <= self.num_action_slots)
        if check:
            check_action_slots(labels, self.num_action_slots)
        return slots

    def proprio_features(self, proprio: torch.Tensor | None) -> torch.Tensor | None:
        """Normalized proprio `[B, Q]` -> one token `[B, 1, D]` (None without a proprio projector)."""
        if self.proprio_projector is None:
            return None
        if proprio is None:
            raise ValueError(f"This model was built with proprio_dim={self.proprio_dim}: pass proprio [B, Q].")
        return self.proprio_projector(proprio.to(self.proprio_projector.fc1.weight.dtype))[:, None]

    def bidirectional_llm(self, text: torch.Tensor, prefix: torch.Tensor, attention_mask: torch.Tensor | None,
                          all_layers: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the LLM over `[text[:, :1], prefix [B, N, D], text[:, 1:]]` (text embeddings `[B, T, D]`, `attention_mask
        [B, T]` its padding), every real token seeing every other. Returns the last hidden state `[B, T + N, D]` or,
        with `all_layers`, the L + 1 hidden states (the embeddings, then each layer's output; the last after the final
        norm, as transformers returns them)."""
        batch, dtype = text.shape[0], text.dtype
        fused = torch.cat([text[:, :1], prefix.to(dtype), text[:, 1:]], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        ones = torch.ones(batch, prefix.shape[1], dtype=attention_mask.dtype, device=attention_mask.device)
        padding = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        llm = self.llm_backbone.llm
        mask = bidirectional_mask(padding, dtype, llm.config._attn_implementation)
        output = llm.model(inputs_embeds=fused, attention_mask=mask, use_cache=False, output_hidden_states=all_layers)
        return output.hidden_states if all_layers else output.last_hidden_state

    def patch_embeddings(self, pixel_values: Cameras,
                         language: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One camera (`[B, 3, S, S]` or a dict of them) or a list/tuple of cameras -> projected patches
        `[B, C*P, D]`, cameras in order (all cameras go through the vision backbone as one batch). `language`:
        FiLM's `(embeddings [B, T, D], mask [B, T])` for a FiLMed backbone."""
        cameras = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else [pixel_values]
        if isinstance(cameras[0], dict):
            stacked: PixelValues = {k: torch.cat([c[k] for c in cameras]) for k in cameras[0]}
        else:
            stacked = torch.cat(cameras)
        with torch.set_grad_enabled(self.vision_backbone_requires_grad and torch.is_grad_enabled()):
            if language is None:
                features = self.vision_backbone(stacked)  # [C*B, P, d_vision]
            else:
                embeddings, mask = language
                features = self.vision_backbone(stacked, embeddings.repeat(len(cameras), 1, 1),
                                                mask.repeat(len(cameras), 1))
        projected = self.projector(features)  # [C*B, P, D]
        num_cameras, patches, dim = len(cameras), projected.shape[1], projected.shape[2]
        batch = projected.shape[0] // num_cameras
        return projected.reshape(num_cameras, batch, patches, dim).transpose(0, 1).reshape(batch, -1, dim)

    # --- inference ----------------------------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> list[int]:
        """The ids training appends after the slots (the prompt builder's stop text; none when `uses_stop_ids` is
        False)."""
        if not self.uses_stop_ids:
            return []
        tokenizer = self.llm_backbone.get_tokenizer()
        return list(tokenizer(self.llm_backbone.prompt_builder_fn.stop_text.rstrip(),
                              add_special_tokens=False).input_ids)

    @property
    def placeholder_id(self) -> int:
        """The id at every slot whose input embedding the model replaces (the pad id; any id would do)."""
        return self.llm_backbone.llm.config.pad_token_id or 0

    def append_action_slots(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None
                            ) -> tuple[torch.LongTensor, torch.Tensor, torch.LongTensor]:
        """Right-padded prompt prefixes `[B, T]` -> `(ids, mask, labels)` `[B, T + N + S]`: each row's prefix, N
        placeholder slots (supervised in `labels`), the S stop ids, then padding (as the training layout)."""
        stop = torch.tensor(self.stop_token_ids, dtype=input_ids.dtype, device=input_ids.device)
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        lengths = attention_mask.long().sum(dim=1, keepdim=True)  # [B, 1]
        new_length, num_slots = length + self.num_action_slots + stop.numel(), self.num_action_slots
        q = torch.arange(new_length, device=input_ids.device)[None].expand(batch, -1)  # [B, L']
        pad_id = self.placeholder_id
        ids = torch.full((batch, new_length), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        ids[:, :length] = torch.where(attention_mask.bool(), input_ids, pad_id)
        is_slot = (q >= lengths) & (q < lengths + num_slots)
        is_stop = (q >= lengths + num_slots) & (q < lengths + num_slots + stop.numel())
        stop_index = (q - lengths - num_slots).clamp(0, max(stop.numel() - 1, 0))
        ids = torch.where(is_stop, stop[stop_index] if stop.numel() else ids, ids)
        ids = torch.where(is_slot, torch.full_like(ids, pad_id), ids)
        mask = q < lengths + num_slots + stop.numel()
        labels = torch.where(is_slot | is_stop, ids, torch.full_like(ids, IGNORE_INDEX))
        return ids, mask.to(attention_mask.dtype), labels

    def predict_action(self, images: Any, instruction: str, proprio: Any = None, unnorm_key: str | None = None,
                       num_inference_steps: int | None = None, seed: int = 0) -> Any:
        """Camera images (PIL, one per camera), instruction, raw proprio -> un-normalized `[H, A]` numpy actions
        (`models/chunk_predict.py`, through the family's `predict_action_chunk`)."""
        from vla_train.models.chunk_predict import predict_action  # lazy: it imports this module

        return predict_action(self, images, instruction, proprio, unnorm_key, num_inference_steps, seed)


def check_action_slots(labels: torch.Tensor, num_slots: int) -> None:
    """Raise unless every row of `labels [B, T]` supervises at least `num_slots` positions, none at the first."""
    supervised = labels != IGNORE_INDEX
    counts = supervised.sum(dim=1)
    if not bool(((counts >= num_slots) & ~supervised[:, 0]).all()):
        raise ValueError(f"Every row's labels must supervise at least {num_slots} action positions after the first "
                         f"token; got counts {counts.tolist()}. Fix: build samples with the policy's batch transform, "
                         "whose chunk length and action dim (or query count) match the model's.")


def fresh_generator(device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from the global RNG (so `torch.manual_seed` makes runs reproducible)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(0, 2**62, ()).item()))
    return generator
