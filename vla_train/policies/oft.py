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
from vla_train.policies.chunk_policy import BaseChunkPolicy


class OFTPolicy(BaseChunkPolicy):
    config: OFTPolicyConfig

    def write_checkpoint_files(self, model: nn.Module, full_state: dict[str, torch.Tensor], directory: Path, step: int,
                               dataset_statistics: dict[str, Any]) -> None:
        """OFT's per-step files, `lora_adapter/` and `dataset_statistics.json` (`export/oft_checkpoint.py`), so OFT's
        evaluation scripts load the checkpoint directory."""
        write_oft_checkpoint(full_state, directory, step, featurizer_keys=model.vision_backbone.keys,
                             film=model.has_film, lora=model.lora, dataset_statistics=dataset_statistics)

    def forward_options(self, model: nn.Module) -> dict[str, Any]:
        return {"sample_steps": self._sample_steps(model)}

    def _sample_steps(self, model: nn.Module) -> int | None:
        """Evaluation of a diffusion head samples the chunk (its L1 is the held-out metric); training never does."""
        return None if model.training or self.config.head != "diffusion" else self.config.num_diffusion_steps_inference
