"""VLA-Adapter: a PrismaticVLM with N learned ActionQuery tokens whose every layer's features feed a Bridge-Attention
policy (`bridge.py`).

Shapes: B batch, T text length, C cameras, P patches per camera, D LLM width, L LLM depth, N ActionQuery tokens, H chunk
length, A action dim, Q proprio dim. The processor gives `input_ids [B, T]` = prompt prefix + N placeholder ids (no stop
ids, as upstream's Qwen recipe), right padded, `labels` supervising the placeholders only. The LLM input is
`[emb(first token), patches [C*P], emb(text[1:])]` with the placeholders' input embeddings replaced by
`action_queries.weight [N, D]` (in order); proprio is not in the sequence. Attention is bidirectional over the real
tokens (`models/attention.py`, no transformers fork).
The policy reads every hidden state (the embeddings and the L layer outputs, the last after the final norm, as
transformers returns them): per layer the raw features `h[:, :C*P]` (first token + the first C*P - 1 patches: upstream's
slice, which starts at BOS) and the ActionQuery states, read one position before each placeholder as upstream's
training reads them (`h[:, C*P:-1]` under `labels[:, 1:]`). Upstream's inference reads the placeholders' own positions;
here training and inference read the same ones. Loss: L1 on normalized actions over valid chunk steps.
"""

import torch
from torch import nn

from vla_train.models.chunk_vlm import Cameras, ChunkOutput, ChunkVLM, fresh_generator
from vla_train.models.llm import LLMBackbone
from vla_train.models.oft.heads import ProprioProjector, masked_error_sum
from vla_train.models.policy_vlm import HEAD_INIT_SEED
from vla_train.models.vision import VisionBackbone
from vla_train.models.vla_adapter.bridge import BridgeActionHead

NEW_MODULE_KEYS = ("action_queries", "action_head", "proprio_projector")
LayerFeatures = tuple[list[torch.Tensor], list[torch.Tensor]]  # per hidden state: raw features, ActionQuery states


class VLAAdapterVLM(ChunkVLM):
    """PrismaticVLM + `action_queries` (nn.Embedding(N, D), zero init) + `action_head` (Bridge policy, one block per
    LLM layer) + `proprio_projector` (when proprio_dim > 0): VLA-Adapter's names."""

    new_module_keys = NEW_MODULE_KEYS
    uses_stop_ids = False

    def __init__(self, model_id: str, vision_backbone: VisionBackbone, llm_backbone: LLMBackbone, *, action_dim: int,
                 chunk_length: int, proprio_dim: int | None = None, num_action_queries: int = 64, pro: bool = True,
                 num_heads: int = 8, inference_query_noise: bool = False, arch_specifier: str = "gelu-mlp",
                 enable_mixed_precision_training: bool = True, init_seed: int = HEAD_INIT_SEED) -> None:
        super().__init__(model_id, vision_backbone, llm_backbone, action_dim=action_dim, chunk_length=chunk_length,
                         proprio_dim=proprio_dim, arch_specifier=arch_specifier,
                         enable_mixed_precision_training=enable_mixed_precision_training, init_seed=init_seed)
        self.num_action_queries, self.pro, self.num_heads = num_action_queries, pro, num_heads
        self.inference_query_noise = inference_query_noise
        self.num_policy_blocks = llm_backbone.llm.config.num_hidden_layers
        self._add_new_modules()

    def _new_modules(self) -> dict[str, nn.Module]:
        llm_dim = self.llm_backbone.embed_dim
        queries = nn.Embedding(self.num_action_queries, llm_dim)
        nn.init.zeros_(queries.weight)
        modules: dict[str, nn.Module] = {
            "action_queries": queries,
            "action_head": BridgeActionHead(llm_dim, self.action_dim, self.chunk_length, self.num_policy_blocks,
                                            self.pro, self.num_heads)}
        if self.proprio_dim:
            modules["proprio_projector"] = ProprioProjector(llm_dim, self.proprio_dim)
        return modules

    @property
    def num_action_slots(self) -> int:
        return self.num_action_queries

    def policy_fsdp_units(self) -> list[nn.Module]:
        """Each Bridge block is its own FSDP unit (after the LLM's layers, in forward order)."""
        return list(self.action_head.model.mlp_resnet_blocks)

    def policy_checkpoint_containers(self) -> list[nn.Module]:
        """The Bridge blocks are activation-checkpointed like decoder layers."""
        return [self.action_head.model.mlp_resnet_blocks]

    # --- features -----------------------------------------------------------------------------------------------
    def layer_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                       patches: torch.Tensor, slots: torch.Tensor) -> LayerFeatures:
        """Run the LLM bidirectionally over `[first token, patches [B, C*P, D], text[1:]]` with the slots' inputs
        replaced by the ActionQueries; returns, per hidden state 0..L, the raw features `[B, C*P, D]` and the
        ActionQuery states `[B, N, D]` (module docstring)."""
        embeddings = self.llm_backbone.embed_input_ids(input_ids)  # [B, T, D]
        batch, dtype = embeddings.shape[0], embeddings.dtype
        queries = self.action_queries.weight.to(dtype).repeat(batch, 1)  # [B*N, D], row b's slots in order
        text = embeddings.masked_scatter(slots[..., None], queries)
        num_patches = patches.shape[1]
        hidden = self.bidirectional_llm(text, patches, attention_mask, all_layers=True)  # L + 1 x [B, T + C*P, D]
        rows, positions = slots.nonzero(as_tuple=True)  # row-major: slot k of row b at b * N + k
        read = positions + num_patches - 1  # one position before each slot in the fused sequence
        task = [h[:, :num_patches] for h in hidden]
        states = [h[rows, read].reshape(batch, self.num_action_queries, -1) for h in hidden]
        return task, states

    def _predict(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, pixel_values: Cameras,
                 slots: torch.Tensor, proprio: torch.Tensor | None,
                 generator: torch.Generator | None) -> torch.Tensor:
        """Normalized actions `[B, H, A]`; `generator` draws the training noise of the query input (None: none)."""
        task, states = self.layer_features(input_ids, attention_mask, self.patch_embeddings(pixel_values), slots)
        proprio_token = self.proprio_features(proprio)
        if proprio_token is not None:
            proprio_token = proprio_token.to(states[0].dtype)
        return self.action_head.predict_action(task, states, proprio_token, generator)

    # --- training -----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, pixel_values: Cameras,
                labels: torch.LongTensor, actions: torch.Tensor | None = None, action_mask: torch.Tensor | None = None,
                proprio: torch.Tensor | None = None, normalizer: torch.Tensor | float | None = None,
                generator: torch.Generator | None = None, check_slots: bool = True) -> ChunkOutput:
        """Actions `[B, H, A]` (normalized), `action_mask [B, H]` (True = valid step), `proprio [B, Q]`.
        loss = sum |pred - actions| over valid elements / `normalizer` (default: this batch's count = mean). In
        training mode (and with `inference_query_noise`) the query input gets its N(0, 0.02) noise from `generator`
        (default: from the global RNG)."""
        slots = self.action_slot_mask(labels, check=check_slots)
        noise = None
        if self.training or self.inference_query_noise:
            noise = generator if generator is not None else fresh_generator(input_ids.device)
        predicted = self._predict(input_ids, attention_mask, pixel_values, slots, proprio, noise)
        if actions is None:
            return ChunkOutput(predicted_actions=predicted)
        loss_sum, count = masked_error_sum((predicted - actions.to(predicted.dtype)).abs(), action_mask)
        loss = loss_sum / (normalizer if normalizer is not None else count.clamp(min=1))
        return ChunkOutput(loss=loss, predicted_actions=predicted, loss_sum=loss_sum, count=count)

    # --- inference ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                             pixel_values: Cameras, proprio: torch.Tensor | None = None,
                             labels: torch.LongTensor | None = None, generator: torch.Generator | None = None,
                             num_inference_steps: int | None = None) -> torch.Tensor:
        """Normalized actions `[B, H, A]` in one forward: the query input is zeros (upstream), or with
        `inference_query_noise` one N(0, 0.02) draw from `generator` (default: seed 0), as in training. Without
        `labels`, `input_ids` are right-padded prompt prefixes and the N placeholders are appended
        (`append_action_slots`)."""
        if labels is None:
            input_ids, attention_mask, labels = self.append_action_slots(input_ids, attention_mask)
        slots = self.action_slot_mask(labels)
        noise = None
        if self.inference_query_noise:
            noise = generator if generator is not None else torch.Generator(input_ids.device).manual_seed(0)
        return self._predict(input_ids, attention_mask, pixel_values, slots, proprio, noise)
