"""The `oft` policy: OpenVLA-OFT (parallel decoding of a whole action chunk with a continuous head).

The model is `OFTVLM` (`PolicyConfig.build_model` wraps the base VLM; `vla_train/models/oft/`). A sample is the
OpenVLA prompt answered by the chunk's H*A action tokens (`ChunkBatchTransform`: the tokens only mark the action
slots; the targets are the normalized chunk `actions [H, A]`), with every configured camera and, when
`proprio_dim > 0`, the normalized proprio. The loss sums over the valid chunk elements (steps before the episode end,
times A): that count is the loss weight, so accumulation and rank averaging give the mean over the global batch.
"""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_train.config.policy import OFTPolicyConfig
from vla_train.export.oft_checkpoint import write_oft_checkpoint
from vla_train.policies.base import Batch, PolicyOutput, TokenCounts
from vla_train.policies.chunk_policy import BaseChunkPolicy, camera_list
from vla_train.policies.chunk_processor import ChunkBatchTransform
from vla_train.policies.openvla import model_action_tokenizer


class OFTPolicy(BaseChunkPolicy):
    config: OFTPolicyConfig

    def write_checkpoint_files(self, model: nn.Module, full_state: dict[str, torch.Tensor], directory: Path, step: int,
                               dataset_statistics: dict[str, Any]) -> None:
        """OFT's per-step files, `lora_adapter/` and `dataset_statistics.json` (`export/oft_checkpoint.py`), so OFT's
        evaluation scripts load the checkpoint directory."""
        write_oft_checkpoint(full_state, directory, step, featurizer_keys=model.vision_backbone.keys,
                             film=model.has_film, lora=model.lora, dataset_statistics=dataset_statistics)

    def batch_transform(self, model: nn.Module) -> ChunkBatchTransform:
        llm = model.llm_backbone
        return ChunkBatchTransform(model_action_tokenizer(model), llm.get_tokenizer(),
                                   model.vision_backbone.get_image_transform(), llm.prompt_builder_fn, self.needs)

    def forward(self, model: nn.Module, inputs: Batch, normalizer: float | None) -> PolicyOutput:
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=camera_list(inputs["pixel_values"]), labels=inputs["labels"],
                       actions=inputs["actions"], action_mask=inputs["action_mask"], proprio=inputs.get("proprio"),
                       normalizer=normalizer, check_slots=False, sample_steps=self._sample_steps(model))
        return PolicyOutput(loss=output.loss, loss_weight=output.count, output=output)

    def _sample_steps(self, model: nn.Module) -> int | None:
        """Evaluation of a diffusion head samples the chunk (its L1 is the held-out metric); training never does."""
        return None if model.training or self.config.head != "diffusion" else self.config.num_diffusion_steps_inference

    def token_counts(self, model: nn.Module, inputs: Batch) -> TokenCounts:
        """LLM positions = text + patches of every camera + the proprio / timestep tokens; supervised = slots."""
        labels = inputs["labels"]
        text_lengths = inputs["attention_mask"].sum(dim=1)
        extra = len(self.config.cameras) * model.num_patches + int(self.config.proprio_dim > 0) \
            + int(self.config.head == "diffusion")
        slots = self.config.chunk_length * self.config.action_dim
        return TokenCounts(samples=labels.shape[0], positions=text_lengths.sum() + labels.shape[0] * extra,
                           supervised=labels.shape[0] * slots, text_lengths=text_lengths)
