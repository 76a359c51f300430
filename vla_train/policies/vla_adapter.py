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
from vla_train.policies.chunk_policy import BaseChunkPolicy


class VLAAdapterPolicy(BaseChunkPolicy):
    config: VLAAdapterPolicyConfig

    def num_slots(self) -> int:
        return self.config.num_action_queries

    def transform_options(self, model: nn.Module) -> dict[str, Any]:
        """N placeholder ids (their embeddings become the ActionQueries) and no stop ids."""
        return {"num_queries": self.config.num_action_queries, "placeholder_id": model.placeholder_id}

    def write_checkpoint_files(self, model: nn.Module, full_state: dict[str, torch.Tensor], directory: Path, step: int,
                               dataset_statistics: dict[str, Any]) -> None:
        """VLA-Adapter's `action_head--<step>_checkpoint.pt`, `proprio_projector--...`, `lora_adapter/` and
        `dataset_statistics.json`."""
        write_vla_adapter_checkpoint(full_state, directory, step, pro=model.pro,
                                     featurizer_keys=model.vision_backbone.keys, lora=model.lora,
                                     dataset_statistics=dataset_statistics)
