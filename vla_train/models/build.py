"""Compose a PrismaticVLM / OpenVLA from a ModelConfig: vision backbone, LLM backbone, projector.

Weights: the vision featurizers and projector start from deterministic random initialization (seeded identically on
every rank); the LLM starts from a local Hugging Face directory when one is given (FP32), else from its architecture
(`model_cfg.llm_config` when set, else the registry's). Real weights then come from a Prismatic run directory
(`vla_train.models.run_dir`).
"""

from pathlib import Path

import torch

from vla_train.config.model import ModelConfig
from vla_train.models.llm import LLMBackbone
from vla_train.models.openvla import NormStats, OpenVLA
from vla_train.models.vision import VisionBackbone
from vla_train.models.vlm import PrismaticVLM

DEFAULT_INIT_SEED = 7


def build_vlm(
    model_cfg: ModelConfig,
    *,
    vla: bool = False,
    norm_stats: NormStats | None = None,
    llm_hf_dir: str | Path | None = None,
    inference_mode: bool = False,
    init_seed: int = DEFAULT_INIT_SEED,
) -> PrismaticVLM:
    """Build the model described by `model_cfg` in FP32 (an `OpenVLA` when `vla`), on the current default device.

    Random initialization runs under a forked RNG seeded with `init_seed`, so every rank builds identical weights
    and the caller's RNG state is untouched. Works under `with torch.device("meta")` for size checks.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        # the vision backbone first: build_vision_backbone relies on it
        vision = VisionBackbone(model_cfg.vision_backbone_id, model_cfg.image_resize_strategy)
        if llm_hf_dir is not None:
            llm = LLMBackbone.from_pretrained_dir(model_cfg.llm_backbone_id, llm_hf_dir, model_cfg.llm_max_length,
                                                  inference_mode=inference_mode, llm_config=model_cfg.llm_config)
        else:
            llm = LLMBackbone.from_config(model_cfg.llm_backbone_id, model_cfg.llm_max_length,
                                          inference_mode=inference_mode, llm_config=model_cfg.llm_config)
    common = dict(arch_specifier=model_cfg.arch_specifier,
                  enable_mixed_precision_training=model_cfg.enable_mixed_precision_training)
    if vla:
        return OpenVLA(model_cfg.model_id, vision, llm, norm_stats=norm_stats, **common)
    return PrismaticVLM(model_cfg.model_id, vision, llm, **common)


def build_vision_backbone(model_cfg: ModelConfig, init_seed: int = DEFAULT_INIT_SEED) -> VisionBackbone:
    """The vision backbone alone, with exactly the weights `build_vlm(model_cfg, init_seed=init_seed)` gives it (it
    is the first module built after seeding there): what a checkpoint without vision weights starts from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return VisionBackbone(model_cfg.vision_backbone_id, model_cfg.image_resize_strategy)


def check_all_fp32(model: torch.nn.Module) -> None:
    """Raise if any parameter is not FP32 (the master-weight invariant training relies on)."""
    for name, param in model.named_parameters():
        if param.dtype != torch.float32:
            raise ValueError(f"Parameter {name} is {param.dtype}, expected torch.float32 master weights.")
