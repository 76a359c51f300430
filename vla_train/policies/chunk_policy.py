"""What the action-chunk policies share (OpenVLA-OFT, VLA-Adapter): their data needs, the data check against the
mixture's statistics, the processor and collator, the loss weight (valid chunk elements), the forward through the
model, the chunk metrics with the mean-action baseline and the token counts. A family subclass sets its options
(`transform_options`, `forward_options`, `num_slots`) and writes its checkpoint files.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_train.config.policy import PolicyConfig
from vla_train.data.collator import PaddedCollatorForActionPrediction
from vla_train.data.normalization import normalize_np
from vla_train.data.sample import DataNeeds
from vla_train.models.chunk_vlm import check_action_slots
from vla_train.policies.base import Batch, Policy, PolicyOutput, TokenCounts
from vla_train.policies.chunk_metrics import ChunkMetrics
from vla_train.policies.chunk_processor import ChunkBatchTransform
from vla_train.policies.openvla import model_action_tokenizer


def camera_list(pixel_values: torch.Tensor | dict[str, torch.Tensor]) -> list[Any]:
    """Collated pixels with a camera axis (`[B, C, 3, S, S]`, or a dict of them per featurizer) -> one entry per
    camera (`[B, 3, S, S]` or a dict), as `ChunkVLM` takes them."""
    if isinstance(pixel_values, dict):
        per_key = {key: value.unbind(1) for key, value in pixel_values.items()}
        return [dict(zip(per_key, camera, strict=True)) for camera in zip(*per_key.values(), strict=True)]
    return list(pixel_values.unbind(1))


class BaseChunkPolicy(Policy):
    """A chunk policy; its config has `chunk_length`, `action_dim`, `proprio_dim` and `cameras`."""

    config: Any

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self.mean_actions: dict[str, np.ndarray] | None = None  # per dataset, normalized (set by check_data)

    @property
    def needs(self) -> DataNeeds:
        config = self.config
        return DataNeeds(chunk_length=config.chunk_length, cameras=tuple(config.cameras),
                         proprio=config.proprio_dim > 0, continuous_actions=True)

    def pipeline_overrides(self) -> dict[str, Any]:
        return self.needs.pipeline_overrides()

    def check_data(self, dataset_statistics: dict[str, Any]) -> None:
        """Every dataset's action (and proprio) dimension must be the configured one: a clear error now, not a
        shape error in the first forward. Keeps each dataset's normalized mean action for the metrics' baseline."""
        for name, stats in dataset_statistics.items():
            dims = {"action_dim": len(stats["action"]["mean"])}
            if self.config.proprio_dim:
                dims["proprio_dim"] = len(stats.get("proprio", {}).get("mean", []))
            for option, found in dims.items():
                if found != getattr(self.config, option):
                    raise ValueError(f"Dataset {name!r} has {option.split('_')[0]} dimension {found}, but "
                                     f"--vla.policy.{option} = {getattr(self.config, option)}. Fix: pass "
                                     f"--vla.policy.{option} {found}.")
        self.mean_actions = {name: normalize_np(np.asarray(stats["action"]["mean"]), stats["action"])
                             for name, stats in dataset_statistics.items()}

    def num_slots(self) -> int:
        """Supervised slot positions each sample's labels must have (OFT: H*A)."""
        return self.config.chunk_length * self.config.action_dim

    def transform_options(self, model: nn.Module) -> dict[str, Any]:
        """Extra `ChunkBatchTransform` fields of the family (OFT: none, the chunk's action tokens are the answer)."""
        return {}

    def forward_options(self, model: nn.Module) -> dict[str, Any]:
        """Extra keyword arguments of the model's training / evaluation forward."""
        return {}

    def batch_transform(self, model: nn.Module) -> ChunkBatchTransform:
        llm = model.llm_backbone
        return ChunkBatchTransform(model_action_tokenizer(model), llm.get_tokenizer(),
                                   model.vision_backbone.get_image_transform(), llm.prompt_builder_fn, self.needs,
                                   **self.transform_options(model))

    def forward(self, model: nn.Module, inputs: Batch, normalizer: float | None) -> PolicyOutput:
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=camera_list(inputs["pixel_values"]), labels=inputs["labels"],
                       actions=inputs["actions"], action_mask=inputs["action_mask"], proprio=inputs.get("proprio"),
                       normalizer=normalizer, check_slots=False, **self.forward_options(model))
        return PolicyOutput(loss=output.loss, loss_weight=output.count, output=output)

    def token_counts(self, model: nn.Module, inputs: Batch) -> TokenCounts:
        """LLM positions = text (slots included) + patches of every camera + the family's extra prefix tokens;
        supervised = the slots."""
        labels = inputs["labels"]
        text_lengths = inputs["attention_mask"].sum(dim=1)
        extra = len(self.config.cameras) * model.num_patches + model.num_extra_prefix_tokens
        return TokenCounts(samples=labels.shape[0], positions=text_lengths.sum() + labels.shape[0] * extra,
                           supervised=labels.shape[0] * self.num_slots(), text_lengths=text_lengths)

    def collator(self, model: nn.Module) -> PaddedCollatorForActionPrediction:
        tokenizer = model.llm_backbone.get_tokenizer()
        return PaddedCollatorForActionPrediction(tokenizer.model_max_length, tokenizer.pad_token_id)

    def loss_weight(self, batch: Batch) -> float:
        """Valid chunk elements: valid steps * A (checks the action slots on the CPU, so the forward need not)."""
        check_action_slots(batch["labels"], self.num_slots())
        return float(batch["action_mask"].sum()) * self.config.action_dim

    def metrics(self, model: nn.Module, dataset_names: Sequence[str], device: torch.device,
                prefix: str = "VLA Train") -> ChunkMetrics:
        return ChunkMetrics(dataset_names, device, prefix, mean_actions=self.mean_actions)

