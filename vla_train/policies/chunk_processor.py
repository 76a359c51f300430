"""Frames -> tensors for policies that predict an action chunk in one pass (OpenVLA-OFT, VLA-Adapter).

`ChunkBatchTransform` turns a numpy frame into a chunk policy's training sample: OFT's prompt "What action should the
robot take to {instruction}?" answered by the whole chunk's action tokens (H x A ids, step t first, then t+1, ...:
OFT's order) and the stop token, with labels on exactly those (`vla_training_ids`, as for OpenVLA; the model reads the
chunk from the action slots' positions), or, for VLA-Adapter (`num_queries > 0`), the prompt answered by N placeholder
ids and no stop ids (their input embeddings become the ActionQueries); the normalized chunk `actions [H, A]` and its
`action_mask [H]` (False past the episode's end); normalized `proprio [P]` when the policy uses it; and the pixels of
every camera role in `needs.cameras` order, stacked on a camera axis: `[C, 3, S, S]` float32 (or channels-last
`[C, S, S, 3]` uint8 with `uint8_pixels`, normalized on the device), per featurizer key for fused backbones.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vla_train.data.collator import stack_sharing
from vla_train.data.sample import DataNeeds, Sample, sample_from_frame
from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.prompts import PromptBuilder
from vla_train.models.vla_prompt import vla_training_ids


def chunk_sample_tensors(sample: Sample, cameras: tuple[str, ...], image_transform: Any,
                         uint8_pixels: bool) -> dict[str, Any]:
    """A chunk sample's tensors besides the text: the cameras' pixels stacked on a camera axis (`[C, ...]` per
    featurizer key), `actions [H, A]`, `action_mask [H]`, `proprio [P]` when the sample has it, and its dataset."""
    images = [sample.images[role] for role in cameras]
    if uint8_pixels:
        pixels = [image_transform.to_uint8(image) for image in images]
    else:
        pixels = [image_transform(Image.fromarray(image)) for image in images]
    item = {"pixel_values": stack_sharing(pixels, torch.stack),
            "actions": torch.from_numpy(np.ascontiguousarray(sample.actions, dtype=np.float32)),
            "action_mask": torch.from_numpy(np.ascontiguousarray(sample.action_mask, dtype=bool)),
            "dataset_name": sample.dataset_name}
    if sample.proprio is not None:
        item["proprio"] = torch.from_numpy(np.ascontiguousarray(sample.proprio, dtype=np.float32))
    return item


@dataclass
class ChunkBatchTransform:
    """numpy frame (pipeline built with `needs.pipeline_overrides()`) -> one chunk-policy sample (module docstring)."""

    action_tokenizer: ActionTokenizer
    base_tokenizer: PreTrainedTokenizerBase
    image_transform: Any  # an ImageTransform
    prompt_builder_fn: type[PromptBuilder]
    needs: DataNeeds
    uint8_pixels: bool = False  # as RLDSBatchTransform: geometry on the host, normalization on the device
    num_queries: int = 0  # > 0: VLA-Adapter's layout, N placeholder ids (`placeholder_id`) and no stop ids
    placeholder_id: int = 0

    def __call__(self, frame: dict[str, Any]) -> dict[str, Any]:
        sample = sample_from_frame(frame, self.needs)
        if self.num_queries:
            input_ids, labels = vla_training_ids(self.prompt_builder_fn, self.base_tokenizer, sample.instruction,
                                                 [self.placeholder_id] * self.num_queries, append_stop=False)
        else:
            chunk_ids = self.action_tokenizer.encode_to_ids(sample.actions).reshape(-1)  # [H * A], step-major
            input_ids, labels = vla_training_ids(self.prompt_builder_fn, self.base_tokenizer, sample.instruction,
                                                 chunk_ids, predict_stop_token=True)
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                **chunk_sample_tensors(sample, self.needs.cameras, self.image_transform, self.uint8_pixels)}
