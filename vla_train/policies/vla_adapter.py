"""The `vla-adapter` policy: VLA-Adapter (ActionQuery tokens + a Bridge-Attention policy over every LLM layer).

The model is `VLAAdapterVLM` (`vla_train/models/vla_adapter/`). A sample is the VLA prompt followed by N placeholder
ids (`ChunkBatchTransform` with `num_queries`), every configured camera, the normalized proprio when
`proprio_dim > 0`, and the normalized chunk `actions [H, A]` with its validity mask. The L1 loss sums over valid
chunk elements, which are also the loss weight (as OFT's). Checkpoints also hold VLA-Adapter's own files
(`export/vla_adapter_files.py`), so its evaluation code loads a checkpoint directory.
"""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_train.config.policy import VLAAdapterPolicyConfig
from vla_train.export.vla_adapter_files import write_vla_adapter_checkpoint
from vla_train.policies.base import Batch, PolicyOutput, TokenCounts
from vla_train.policies.chunk_policy import BaseChunkPolicy, camera_list
from vla_train.policies.chunk_processor import ChunkBatchTransform
from vla_train.policies.openvla import model_action_tokenizer


class VLAAdapterPolicy(BaseChunkPolicy):
    config: VLAAdapterPolicyConfig

    def num_slots(self) -> int:
        return self.config.num_action_queries

    def batch_transform(self, model: nn.Module) -> ChunkBatchTransform:
        llm = model.llm_backbone
        return ChunkBatchTransform(model_action_tokenizer(model), llm.get_tokenizer(),
                                   model.vision_backbone.get_image_transform(), llm.prompt_builder_fn, self.needs,
                                   num_queries=self.config.num_action_queries, placeholder_id=model.placeholder_id)

    def write_checkpoint_files(self, model: nn.Module, full_state: dict[str, torch.Tensor], directory: Path, step: int,
                               dataset_statistics: dict[str, Any]) -> None:
        """VLA-Adapter's `action_head--<step>_checkpoint.pt`, `proprio_projector--...`, `lora_adapter/` and
        `dataset_statistics.json`."""
        write_vla_adapter_checkpoint(full_state, directory, step, pro=model.pro,
                                     featurizer_keys=model.vision_backbone.keys, lora=model.lora,
                                     dataset_statistics=dataset_statistics)

    def forward(self, model: nn.Module, inputs: Batch, normalizer: float | None) -> PolicyOutput:
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=camera_list(inputs["pixel_values"]), labels=inputs["labels"],
                       actions=inputs["actions"], action_mask=inputs["action_mask"], proprio=inputs.get("proprio"),
                       normalizer=normalizer, check_slots=False)
        return PolicyOutput(loss=output.loss, loss_weight=output.count, output=output)

    def token_counts(self, model: nn.Module, inputs: Batch) -> TokenCounts:
        """LLM positions = text (with the N placeholders) + patches of every camera; supervised = the queries."""
        labels = inputs["labels"]
        text_lengths = inputs["attention_mask"].sum(dim=1)
        extra = len(self.config.cameras) * model.num_patches
        return TokenCounts(samples=labels.shape[0], positions=text_lengths.sum() + labels.shape[0] * extra,
                           supervised=labels.shape[0] * self.config.num_action_queries, text_lengths=text_lengths)
