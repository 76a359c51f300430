"""What the action-chunk policies share (OpenVLA-OFT, VLA-Adapter): their data needs, the data check against the
mixture's statistics, the collator, the loss weight (valid chunk elements) and the chunk metrics with the mean-action
baseline. A family subclass adds its processor, its forward and its checkpoint files.
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
from vla_train.policies.base import Batch, Policy
from vla_train.policies.chunk_metrics import ChunkMetrics


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

