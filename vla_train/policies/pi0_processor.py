"""Frames -> tensors for π0 (`Pi0BatchTransform`): the π0 prompt ids (`models/pi0/prompt.py`: BOS, the cleaned
instruction, "\n"; at most `max_token_len`) with labels all -100 (nothing is token-supervised; the collator pads
them), the pixels of every camera role in `needs.cameras` order stacked on a camera axis (`[C, 3, S, S]` float32,
or channels-last `[C, S, S, 3]` uint8 with `uint8_pixels`, normalized on the device) with an all-True `image_mask
[C]` (every trained camera is present; inference masks absent ones), the normalized chunk `actions [H, A]`, its
`action_mask [H]` and normalized `proprio [Q]` when the policy reads a state.
"""

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from vla_train.data.sample import DataNeeds, sample_from_frame
from vla_train.models.llm import IGNORE_INDEX
from vla_train.models.pi0.prompt import pi0_prompt_ids
from vla_train.policies.chunk_processor import chunk_sample_tensors


@dataclass
class Pi0BatchTransform:
    """numpy frame (pipeline built with the policy's `pipeline_overrides()`) -> one π0 sample (module docstring)."""

    tokenizer: PreTrainedTokenizerBase
    image_transform: Any  # an ImageTransform
    needs: DataNeeds
    max_token_len: int = 48
    uint8_pixels: bool = False  # as RLDSBatchTransform: geometry on the host, normalization on the device

    def __call__(self, frame: dict[str, Any]) -> dict[str, Any]:
        sample = sample_from_frame(frame, self.needs)
        ids = pi0_prompt_ids(self.tokenizer, sample.instruction, self.max_token_len)
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long),
                "image_mask": torch.ones(len(self.needs.cameras), dtype=torch.bool),
                **chunk_sample_tensors(sample, self.needs.cameras, self.image_transform, self.uint8_pixels)}
