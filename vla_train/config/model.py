"""ModelConfig: which base VLM to build (vision backbone, projector, LLM, image resizing) and its VLM-stage recipe.

A draccus `ChoiceRegistry`: `--model.type <model_id>` selects an entry. Registered: the two base VLMs the reference's
VLAs use (`siglip-224px+7b`, `prism-dinosiglip-224px+7b`), a MiniVLA-style Qwen2.5-0.5B + DINO-SigLIP base, and tiny
configs (a few ViT blocks, a 2-layer LM, a project-built tokenizer) for tests and the demo.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

import draccus


@dataclass
class ModelConfig(draccus.ChoiceRegistry):
    """A base VLM. Identifier fields match the reference's run-directory `config.json["model"]`."""

    model_id: str  # registry id, also written to run directories
    arch_specifier: str  # projector: "linear" | "gelu-mlp" | "fused-gelu-mlp" (optionally prefixed, e.g. "no-align+")
    vision_backbone_id: str  # key of vla_train.models.vision.VISION_BACKBONES
    llm_backbone_id: str  # key of vla_train.models.llm.LLM_BACKBONES
    image_resize_strategy: str  # "resize-naive" | "resize-crop" | "letterbox"
    llm_max_length: int = 2048  # tokenizer model_max_length; the collator truncates to it
    # The LLM's Hugging Face config (an export's `text_config`, e.g. {"model_type": "llama", "hidden_size": 4096,
    # "rms_norm_eps": 1e-05, "vocab_size": 32064, ...}): when set, it replaces the registry architecture of
    # `llm_backbone_id`, which still gives the family, tokenizer and prompt format. Imports set it.
    llm_config: dict[str, Any] | None = None

    # VLM recipes (align: projector only; finetune: projector + LLM), as in the reference.
    align_epochs: int = 1
    align_max_steps: int | None = None
    align_global_batch_size: int = 256
    align_per_device_batch_size: int = 16
    align_learning_rate: float = 1e-3
    align_weight_decay: float = 0.0
    align_max_grad_norm: float = 1.0
    align_lr_scheduler_type: str = "linear-warmup+cosine-decay"
    align_warmup_ratio: float = 0.03
    align_train_strategy: str = "fsdp-shard-grad-op"
    finetune_epochs: int = 1
    finetune_max_steps: int | None = None
    finetune_global_batch_size: int = 128
    finetune_per_device_batch_size: int = 16
    finetune_learning_rate: float = 2e-5
    finetune_weight_decay: float = 0.1
    finetune_max_grad_norm: float = 1.0
    finetune_lr_scheduler_type: str = "linear-warmup+cosine-decay"
    finetune_warmup_ratio: float = 0.03
    finetune_train_strategy: str = "fsdp-full-shard"

    enable_gradient_checkpointing: bool = True  # non-reentrant activation checkpointing of LLM decoder layers
    enable_mixed_precision_training: bool = True  # bf16 compute over FP32 master weights
    reduce_in_full_precision: bool = False  # gradient reduction dtype fp32 (True) or bf16


@ModelConfig.register_subclass("siglip-224px+7b")
@dataclass
class SigLIP224px7B(ModelConfig):
    """OpenVLA v0.1's base: SigLIP So400M + Vicuna v1.5 7B, letterboxed images."""

    model_id: str = "siglip-224px+7b"
    arch_specifier: str = "no-align+gelu-mlp"
    vision_backbone_id: str = "siglip-vit-so400m"
    llm_backbone_id: str = "vicuna-v15-7b"
    image_resize_strategy: str = "letterbox"


@ModelConfig.register_subclass("prism-dinosiglip-224px+7b")
@dataclass
class PrismDinoSigLIP224px7B(ModelConfig):
    """OpenVLA 7B's base: fused DINOv2 + SigLIP + Llama-2 7B (pure prompt), naive resize."""

    model_id: str = "prism-dinosiglip-224px+7b"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "llama2-7b-pure"
    image_resize_strategy: str = "resize-naive"
    finetune_epochs: int = 2


@ModelConfig.register_subclass("prism-qwen25-extra-dinosiglip-224px+0_5b")
@dataclass
class PrismQwen25DinoSigLIP224px0_5B(ModelConfig):
    """MiniVLA's base: fused DINOv2 + SigLIP + Qwen2.5-0.5B with 256 extra action tokens."""

    model_id: str = "prism-qwen25-extra-dinosiglip-224px+0_5b"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "qwen25-0_5b-extra"
    image_resize_strategy: str = "resize-naive"


@ModelConfig.register_subclass("pi0-paligemma-224px")
@dataclass
class Pi0PaliGemma224px(ModelConfig):
    """π0's VLM: PaliGemma 3B (SigLIP So400m/14 final-norm features at 224 px, a linear projector, Gemma 2B)."""

    model_id: str = "pi0-paligemma-224px"
    arch_specifier: str = "no-align+linear"
    vision_backbone_id: str = "paligemma-siglip-224px"
    llm_backbone_id: str = "gemma-2b"
    image_resize_strategy: str = "resize-naive"
    llm_max_length: int = 48  # openpi's max_token_len


@ModelConfig.register_subclass("tiny-siglip+tiny-llama")
@dataclass
class TinySigLIPLlama(ModelConfig):
    """Tiny stand-in for `siglip-224px+7b`: a 3-block SigLIP-style ViT at 64 px + a 2-layer Llama."""

    model_id: str = "tiny-siglip+tiny-llama"
    arch_specifier: str = "no-align+gelu-mlp"
    vision_backbone_id: str = "tiny-siglip-vit"
    llm_backbone_id: str = "tiny-llama"
    image_resize_strategy: str = "letterbox"
    llm_max_length: int = 512


@ModelConfig.register_subclass("tiny-dinosiglip+tiny-llama")
@dataclass
class TinyDinoSigLIPLlama(ModelConfig):
    """Tiny stand-in for `prism-dinosiglip-224px+7b` (fused ViTs, fused projector, Llama, pure prompt)."""

    model_id: str = "tiny-dinosiglip+tiny-llama"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    vision_backbone_id: str = "tiny-dinosiglip-vit"
    llm_backbone_id: str = "tiny-llama"
    image_resize_strategy: str = "resize-naive"
    llm_max_length: int = 512


@ModelConfig.register_subclass("tiny-pi0-paligemma")
@dataclass
class TinyPi0PaliGemma(ModelConfig):
    """Tiny stand-in for `pi0-paligemma-224px`: a 3-block final-norm SigLIP-style ViT at 64 px + a 2-layer Gemma."""

    model_id: str = "tiny-pi0-paligemma"
    arch_specifier: str = "no-align+linear"
    vision_backbone_id: str = "tiny-paligemma-siglip"
    llm_backbone_id: str = "tiny-gemma"
    image_resize_strategy: str = "resize-naive"
    llm_max_length: int = 48


@ModelConfig.register_subclass("tiny-dinosiglip+tiny-qwen25")
@dataclass
class TinyDinoSigLIPQwen25(ModelConfig):
    """Tiny stand-in for the MiniVLA base (fused ViTs + a 2-layer Qwen2 with ChatML prompts)."""

    model_id: str = "tiny-dinosiglip+tiny-qwen25"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    vision_backbone_id: str = "tiny-dinosiglip-vit"
    llm_backbone_id: str = "tiny-qwen25"
    image_resize_strategy: str = "resize-naive"
    llm_max_length: int = 512


@dataclass
class CustomModelConfig(ModelConfig):
    """A base VLM outside the registry (e.g. an imported vision/LLM combination), described by its fields alone.

    Deliberately not registered (so not a `--model.type` choice); being a subclass, it encodes with `draccus.encode`
    like the registered entries (the registry's root class cannot be encoded).
    """


def model_config_from_fields(values: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a run directory's `config.json["model"]` values: the registered entry `model_id` with these
    values, or a `CustomModelConfig`. Unknown keys (e.g. `type`) are ignored; a missing identifying field is an error."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    known = {key: value for key, value in values.items() if key in names}
    model_id = known.get("model_id")
    if model_id in ModelConfig.get_known_choices():
        return dataclasses.replace(ModelConfig.get_choice_class(model_id)(), **known)
    required = [f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in known]
    if missing:
        raise ValueError(f"Model config {model_id!r} is not registered and lacks {missing}. Fix: give every field of "
                         f"{required}, or a registered model_id ({sorted(ModelConfig.get_known_choices())}).")
    return CustomModelConfig(**known)


def model_config_section(model_cfg: ModelConfig) -> dict[str, Any]:
    """The run directory's `config.json["model"]` section: `{"type": model_id, <every field>}`."""
    return {"type": model_cfg.model_id, **draccus.encode(model_cfg)}


def get_model_config(model_id: str) -> ModelConfig:
    """An instance of the registered ModelConfig `model_id`."""
    known = sorted(ModelConfig.get_known_choices())
    if model_id not in known:
        raise ValueError(f"Unknown model id {model_id!r}; registered: {known}.")
    return ModelConfig.get_choice_class(model_id)()
