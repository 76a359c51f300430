"""Right-padding collator for VLA batches (facts §6.4), with the attention mask built from lengths.

`input_ids` are padded with the pad id and `labels` with -100, both truncated to `model_max_length`; the mask marks
real tokens by position (the reference compared ids to the pad id, which breaks when the pad id is a real token, as
Qwen's `<|endoftext|>` can be). Pixel values are stacked per tensor, or per key for fused backbones.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100


@dataclass
class PaddedCollatorForActionPrediction:
    model_max_length: int
    pad_token_id: int
    padding_side: str = "right"
    pixel_values_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.padding_side != "right":
            raise ValueError(f"Only right padding is supported for action prediction, got {self.padding_side!r}.")

    def __call__(self, instances: list[dict[str, Any]]) -> dict[str, Any]:
        if not instances:
            raise ValueError("Cannot collate an empty batch.")
        input_ids = [instance["input_ids"][: self.model_max_length] for instance in instances]
        labels = [instance["labels"][: self.model_max_length] for instance in instances]
        lengths = torch.tensor([len(ids) for ids in input_ids])
        padded_ids = pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id)
        padded_labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        attention_mask = torch.arange(padded_ids.shape[1])[None, :] < lengths[:, None]
        pixel_values = [instance["pixel_values"] for instance in instances]
        if any(p is None for p in pixel_values):
            raise ValueError("Every instance needs pixel_values (VLA batches are multimodal).")
        if isinstance(pixel_values[0], dict):
            stacked = {k: torch.stack([p[k] for p in pixel_values]).to(self.pixel_values_dtype) for k in pixel_values[0]}
        else:
            stacked = torch.stack(pixel_values).to(self.pixel_values_dtype)
        batch = {"pixel_values": stacked, "input_ids": padded_ids, "attention_mask": attention_mask,
                 "labels": padded_labels}
        if "dataset_name" in instances[0]:
            batch["dataset_names"] = [instance["dataset_name"] for instance in instances]
        return batch
