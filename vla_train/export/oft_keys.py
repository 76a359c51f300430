"""OpenVLA-OFT's checkpoint key layouts <-> ours (OFT's evaluation code loads its files by these names)."""

from collections.abc import Mapping

import torch

from vla_train.export.keys import hf_to_native, native_to_hf
from vla_train.models.oft.film import FiLMedVisionBackbone


def to_oft_state_dict(vision_backbone: FiLMedVisionBackbone) -> dict[str, torch.Tensor]:
    """Our state dict -> OFT's `vision_backbone--{step}_checkpoint.pt` layout (without LoRA; same tensors)."""
    modules = {"vision_backbone": vision_backbone.state_dict(), "projector": {}, "llm_backbone": {}}
    return native_to_hf(modules, vision_backbone.keys)


def from_oft_state_dict(state: Mapping[str, torch.Tensor], featurizer_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """OFT's (LoRA-merged) `vision_backbone--*` state dict -> ours, for `FiLMedVisionBackbone.load_state_dict`."""
    return hf_to_native(state, featurizer_keys)["vision_backbone"]
