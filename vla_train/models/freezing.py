"""Stage-wise freezing (facts §3): which of vision backbone, projector and LLM train in each stage.

| stage | vision | projector | LLM |
|---|---|---|---|
| `vla-full-train` / `full-finetune` | train | train | train |
| `vla-train` / `finetune` | frozen | train | train |
| `vla-sandwich-train` | train | train | last layer only |
| `vla-last-layer-train` / `last-layer-finetune` | frozen | frozen | last layer only |
| `align` | frozen | train | frozen |

"Last layer" = the LLM's input embeddings, final decoder layer and output head (the final norm stays frozen).
With LoRA (`vlm.lora`), every base weight is frozen and the adapters train, in every stage, except the base modules
the LoRA config trains in full (`full_modules`: π0's SigLIP and projector).
A policy family's own modules (`vlm.always_trainable()`: OFT's heads, projectors and FiLM projections) train in
every stage; FiLM in a frozen ViT keeps the vision gradient path on (only the projections update).
In every stage, the vision modules the forward never calls (each featurizer's last block, final norm, attention pool
and head: `VisionBackbone.unused_modules()`) stay frozen: they never had a gradient, so they never change and are
not in the optimizer (the trainable count of vision-training stages excludes them).
"""

from dataclasses import dataclass

from torch import nn

from vla_train.config.lora import LoRAConfig
from vla_train.log import logger
from vla_train.models.lora import lora_parameters
from vla_train.models.vlm import PrismaticVLM


@dataclass(frozen=True)
class StagePlan:
    vision: bool
    projector: bool
    llm: str  # "all", "last-layer" or "none"


STAGES: dict[str, StagePlan] = {
    "vla-full-train": StagePlan(True, True, "all"),
    "full-finetune": StagePlan(True, True, "all"),
    "vla-train": StagePlan(False, True, "all"),
    "finetune": StagePlan(False, True, "all"),
    "vla-sandwich-train": StagePlan(True, True, "last-layer"),
    "vla-last-layer-train": StagePlan(False, False, "last-layer"),
    "last-layer-finetune": StagePlan(False, False, "last-layer"),
    "align": StagePlan(False, True, "none"),
}


def stage_from_flags(freeze_vision_backbone: bool, freeze_llm_backbone: bool, unfreeze_last_llm_layer: bool) -> str:
    """The VLA stage a VLAConfig's freeze flags select (reference train.py step 9), with clear errors."""
    if not freeze_llm_backbone:
        if unfreeze_last_llm_layer:
            raise ValueError("unfreeze_last_llm_layer=True only makes sense with freeze_llm_backbone=True.")
        return "vla-train" if freeze_vision_backbone else "vla-full-train"
    if not unfreeze_last_llm_layer:
        raise ValueError("freeze_llm_backbone=True needs unfreeze_last_llm_layer=True (a VLA must train its LLM head).")
    return "vla-last-layer-train" if freeze_vision_backbone else "vla-sandwich-train"


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied parameters count once (`parameters()` de-duplicates)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def freeze_backbones(vlm: PrismaticVLM, stage: str) -> None:
    """Set `requires_grad` per stage, plus `trainable_module_keys` and `vision_backbone_requires_grad`."""
    if stage not in STAGES:
        raise ValueError(f"Unknown training stage {stage!r}; choose one of {sorted(STAGES)}.")
    plan = STAGES[stage]
    vlm.vision_backbone.requires_grad_(plan.vision)  # keeps `unused_modules()` frozen
    vlm.projector.requires_grad_(plan.projector)
    vlm.llm_backbone.requires_grad_(plan.llm == "all")
    if plan.llm == "last-layer":
        for module in vlm.llm_backbone.last_layer_finetune_modules:
            module.requires_grad_(True)
    if vlm.lora is not None:  # LoRA: only the adapters train in the backbones, whatever the stage
        adapters = {id(param) for param in lora_parameters(vlm)}
        for param in vlm.parameters():
            param.requires_grad_(id(param) in adapters)
        for key in vlm.lora.full_modules:  # e.g. π0's SigLIP and projector, trained in full beside the adapters
            getattr(vlm, key).requires_grad_(True)  # the vision backbone keeps its unused modules frozen
    for param in vlm.always_trainable():  # a policy's heads, projectors, FiLM: trained in every stage
        param.requires_grad_(True)
    for param in vlm.unused_parameters():  # never reached by the policy's forward (OFT: the LM head)
        param.requires_grad_(False)
    vision_trains = any(param.requires_grad for param in vlm.vision_backbone.parameters())
    vlm.vision_backbone_requires_grad = vision_trains  # FiLM in a frozen ViT needs its gradient path
    base_keys = (("vision_backbone", vision_trains), ("projector", plan.projector),
                 ("llm_backbone", plan.llm != "none"))
    if vlm.lora is not None:
        base_keys = tuple((key, any(p.requires_grad for p in getattr(vlm, key).parameters()))
                          for key, _ in base_keys)
    vlm.trainable_module_keys = [key for key, trains in base_keys if trains] + [
        key for key in vlm.all_module_keys if key not in dict(base_keys)]
    total, trainable = count_parameters(vlm)
    logger.info("Stage %s%s: trainable modules %s; # parameters (in millions): %.3f total, %.3f trainable",
                stage, _lora_note(vlm.lora),
                vlm.trainable_module_keys, total / 1e6, trainable / 1e6)


def _lora_note(lora: LoRAConfig | None) -> str:
    """The stage log's LoRA note: the rank (and per-layer ranks) and what trains beside the adapters."""
    if lora is None:
        return ""
    ranks = f"r={lora.rank}" + (f" ({', '.join(f'{k}: r={v}' for k, v in lora.rank_pattern.items())})"
                                if lora.rank_pattern else "")
    return f" with LoRA {ranks} " + (f"(adapters, {lora.full_modules} in full)" if lora.full_modules
                                     else "(adapters only)")
