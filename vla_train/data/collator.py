"""Right-padding collator for VLA batches (facts §6.4), with the attention mask built from lengths.

`input_ids` are padded with the pad id and `labels` with -100, both truncated to `model_max_length`; the mask marks
real tokens by position (the reference compared ids to the pad id, which breaks when the pad id is a real token, as
Qwen's `<|endoftext|>` can be). Pixel values are stacked per tensor, or per key for fused backbones: float pixels
are cast to `pixel_values_dtype`; uint8 pixels (training: normalized on the device) stay uint8, are stacked with numpy
(no torch intra-op threads), and keys whose per-instance tensors are the same objects (fused featurizers with the
same geometry) share one stacked tensor. Any other per-instance tensor (a policy's action chunk, its mask, proprio) is
stacked under its own key. `pin_memory=True` allocates every output tensor in pinned host memory.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from vla_train.models.llm import IGNORE_INDEX


def stack_sharing(values: list[Any], stack: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    """Stack per-item pixels (tensors, or dicts of featurizer tensors) with `stack`. Keys whose per-item tensors are
    the same objects (fused featurizers with the same geometry) share one stacked tensor."""
    if not isinstance(values[0], dict):
        return stack(values)
    stacked: dict[str, torch.Tensor] = {}
    for key in values[0]:
        twin = next((k for k in stacked if all(v[k] is v[key] for v in values)), None)
        stacked[key] = stacked[twin] if twin is not None else stack([v[key] for v in values])
    return stacked


@dataclass
class PaddedCollatorForActionPrediction:
    model_max_length: int
    pad_token_id: int
    padding_side: str = "right"
    pixel_values_dtype: torch.dtype = torch.float32  # float pixels only; uint8 pixels stay uint8
    pin_memory: bool = False

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
        # per-sample tensors other than the text and pixels (a policy's action chunk, its mask, proprio): stacked
        extra = [key for key, value in instances[0].items()
                 if isinstance(value, torch.Tensor) and key not in ("input_ids", "labels", "pixel_values")]
        tensors = {"input_ids": padded_ids, "attention_mask": attention_mask, "labels": padded_labels,
                   **{key: torch.stack([instance[key] for instance in instances]) for key in extra}}
        if self.pin_memory:
            tensors = {key: tensor.pin_memory() for key, tensor in tensors.items()}
        batch = {"pixel_values": stack_sharing(pixel_values, self._stack), **tensors}
        if "dataset_name" in instances[0]:
            batch["dataset_names"] = [instance["dataset_name"] for instance in instances]
        return batch

    def _stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """`B x [...]` -> `[B, ...]`: uint8 (channels-last `[B, S, S, 3]`) kept, one numpy copy into the (maybe
        pinned) output; float cast."""
        if tensors[0].dtype != torch.uint8:
            stacked = torch.stack(tensors).to(self.pixel_values_dtype)
            return stacked.pin_memory() if self.pin_memory else stacked
        out = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.uint8, pin_memory=self.pin_memory)
        np.stack([tensor.numpy() for tensor in tensors], out=out.numpy())
        return out
