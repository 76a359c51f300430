"""Vision backbones: timm ViT featurizers (one, or two fused) returning patch features `[B, P, D]`.

Every featurizer is built with `pretrained=False` (weights come from checkpoints, never from a download). Its forward
returns the output of the second-to-last block, without the final norm and with prefix tokens (CLS, registers)
removed, as the reference does; blocks after it are not run, and the modules it never calls (last block, final norm,
attention pool, head) are always frozen and FSDP units of their own that are never gathered. A fused backbone
(DINO + SigLIP, DINO + CLIP) concatenates its featurizers' outputs on the feature dimension. Module names
(`featurizer`, `dino_featurizer`, `siglip_featurizer`, `clip_featurizer`) are the reference checkpoint's keys.
"""

import types
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vla_train.models.image_transforms import (
    ImageTransform,
    NormalizationConfig,
    build_featurizer_transform,
    validate_resize_strategy,
)


@dataclass(frozen=True)
class FeaturizerSpec:
    """One timm ViT: its timm id, extra constructor arguments, and whether it resizes without cropping."""

    timm_id: str
    overrides: dict[str, Any] = field(default_factory=dict)
    resize_shorter_side_to_size: bool = False  # the reference's SigLIP / IN1K "do not crop" fix
    final_layer: bool = False  # features after the last block and final norm (PaliGemma), not the penultimate block


@dataclass(frozen=True)
class VisionBackboneSpec:
    """A registry entry: image size S and named featurizers (`""` for a single one, else e.g. dino/siglip)."""

    backbone_id: str
    image_size: int
    featurizers: dict[str, FeaturizerSpec]


# timm ids carry their pretrained tag: the reference trained with these weights (timm 1.0 would otherwise default
# SigLIP to its v2 weights).
_DINO = FeaturizerSpec("vit_large_patch14_reg4_dinov2.lvd142m")
_QUICK_GELU = {"act_layer": "quick_gelu"}


def _siglip(timm_id: str) -> FeaturizerSpec:
    return FeaturizerSpec(timm_id, resize_shorter_side_to_size=True)


def _tiny(timm_id: str, no_crop: bool, **extra: Any) -> FeaturizerSpec:
    overrides = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0}
    return FeaturizerSpec(timm_id, overrides={**overrides, **extra.pop("overrides", {})},
                          resize_shorter_side_to_size=no_crop, **extra)


# PaliGemma's (π0's) SigLIP So400m/14: Hugging Face `SiglipVisionModel`'s `last_hidden_state` (every block, then the
# post-layernorm; tanh-approximated GELU; no attention-pool head), 256 patches at 224 px.
_PALIGEMMA_SIGLIP = {"act_layer": "gelu_tanh", "global_pool": ""}


VISION_BACKBONES: dict[str, VisionBackboneSpec] = {
    spec.backbone_id: spec
    for spec in [
        VisionBackboneSpec("clip-vit-b", 224, {"": FeaturizerSpec("vit_base_patch16_clip_224.openai", _QUICK_GELU)}),
        VisionBackboneSpec("clip-vit-l", 224, {"": FeaturizerSpec("vit_large_patch14_clip_224.openai", _QUICK_GELU)}),
        VisionBackboneSpec(
            "clip-vit-l-336px", 336, {"": FeaturizerSpec("vit_large_patch14_clip_336.openai", _QUICK_GELU)}
        ),
        VisionBackboneSpec("siglip-vit-so400m", 224, {"": _siglip("vit_so400m_patch14_siglip_224.webli")}),
        VisionBackboneSpec("siglip-vit-so400m-384px", 384, {"": _siglip("vit_so400m_patch14_siglip_384.webli")}),
        VisionBackboneSpec("siglip-vit-b16-224px", 224, {"": _siglip("vit_base_patch16_siglip_224.webli")}),
        VisionBackboneSpec("siglip-vit-b16-256px", 256, {"": _siglip("vit_base_patch16_siglip_256.webli")}),
        VisionBackboneSpec("siglip-vit-b16-384px", 384, {"": _siglip("vit_base_patch16_siglip_384.webli")}),
        VisionBackboneSpec("dinov2-vit-l", 224, {"": _DINO}),
        VisionBackboneSpec(
            "in1k-vit-l", 224, {"": FeaturizerSpec("vit_large_patch16_224.augreg_in21k_ft_in1k", {}, True)}
        ),
        VisionBackboneSpec(
            "dinosiglip-vit-so-224px", 224, {"dino": _DINO, "siglip": _siglip("vit_so400m_patch14_siglip_224.webli")}
        ),
        VisionBackboneSpec(
            "dinosiglip-vit-so-384px", 384, {"dino": _DINO, "siglip": _siglip("vit_so400m_patch14_siglip_384.webli")}
        ),
        VisionBackboneSpec(
            "dinoclip-vit-l-336px",
            336,
            {"dino": _DINO, "clip": FeaturizerSpec("vit_large_patch14_clip_336.openai", _QUICK_GELU)},
        ),
        VisionBackboneSpec("paligemma-siglip-224px", 224, {"": FeaturizerSpec(
            "vit_so400m_patch14_siglip_224.webli", _PALIGEMMA_SIGLIP, final_layer=True)}),
        # Tiny backbones for tests and the demo: a few blocks at 64 px, 8 px patches (64 patches).
        VisionBackboneSpec("tiny-siglip-vit", 64, {"": _tiny("vit_so400m_patch14_siglip_224", no_crop=True)}),
        VisionBackboneSpec(
            "tiny-dinosiglip-vit",
            64,
            {
                "dino": _tiny("vit_large_patch14_reg4_dinov2.lvd142m", no_crop=False),
                "siglip": _tiny("vit_so400m_patch14_siglip_224", no_crop=True),
            },
        ),
        VisionBackboneSpec("tiny-paligemma-siglip", 64, {"": _tiny("vit_so400m_patch14_siglip_224", no_crop=False,
                                                                   overrides=_PALIGEMMA_SIGLIP, final_layer=True)}),
    ]
}


def get_vision_backbone_spec(backbone_id: str) -> VisionBackboneSpec:
    if backbone_id not in VISION_BACKBONES:
        raise ValueError(f"Unknown vision backbone {backbone_id!r}; registered: {sorted(VISION_BACKBONES)}.")
    return VISION_BACKBONES[backbone_id]


# Featurizer children the penultimate-block forward never calls (with the last block): frozen, and FSDP units of
# their own that are never gathered. They stay in the state dict (checkpoints and exports keep the full ViT).
UNUSED_TAIL_NAMES = ("norm", "fc_norm", "attn_pool", "head")


def _penultimate_block_forward(self: VisionTransformer, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[B, 3, S, S]` -> `[B, P, D]`: output of block `depth - 2`, no final norm, prefix tokens removed. Blocks after
    `depth - 2` are not run (`stop_early`); the values equal `get_intermediate_layers(x, n=[depth - 2])`."""
    (features,) = self.forward_intermediates(pixel_values, indices=[len(self.blocks) - 2], stop_early=True,
                                             intermediates_only=True, output_fmt="NLC")
    return features


def _final_layer_forward(self: VisionTransformer, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[B, 3, S, S]` -> `[B, P, D]`: every block, then the final norm (`forward_features`; no prefix tokens)."""
    return self.forward_features(pixel_values)[:, self.num_prefix_tokens:]


def unused_featurizer_modules(featurizer: VisionTransformer) -> list[nn.Module]:
    """The modules with parameters that the featurizer's forward never calls: for the penultimate-block forward the
    last block, then the final norm, `fc_norm`, SigLIP's attention pool and the head, where present; for a
    final-layer featurizer only the modules after the final norm."""
    final = getattr(featurizer, "final_layer", False)
    tail = [getattr(featurizer, name, None) for name in UNUSED_TAIL_NAMES[1 if final else 0:]]
    used = [] if final else [featurizer.blocks[-1]]
    return [*used, *(m for m in tail if m is not None and any(True for _ in m.parameters()))]


def build_featurizer(spec: FeaturizerSpec, image_size: int) -> VisionTransformer:
    """A timm ViT (`pretrained=False`, no head) whose `forward` returns penultimate-block patch features (or, with
    `spec.final_layer`, the final-norm features).

    `forward` itself is replaced (not a wrapper method) so that FSDP and hooks see the real computation.
    """
    model = timm.create_model(spec.timm_id, pretrained=False, num_classes=0, img_size=image_size, **spec.overrides)
    if len(model.blocks) < 2:
        raise ValueError(f"Featurizer {spec.timm_id!r} needs at least 2 blocks, has {len(model.blocks)}.")
    model.final_layer = spec.final_layer
    model.forward = types.MethodType(_final_layer_forward if spec.final_layer else _penultimate_block_forward, model)
    return model.eval()


def _normalization_config(model: VisionTransformer, image_size: int) -> NormalizationConfig:
    data_config = timm.data.resolve_model_data_config(model)
    return NormalizationConfig(
        image_size=image_size,
        interpolation=data_config["interpolation"],
        crop_pct=float(data_config["crop_pct"]),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
    )


class VisionBackbone(nn.Module):
    """One or more ViT featurizers; `forward(pixel_values) -> [B, P, sum(D_i)]`.

    `pixel_values` is `[B, 3, S, S]` for one featurizer, or a dict `{key: [B, 3, S, S]}` for fused backbones.
    """

    fsdp_unit_classes: tuple[type[nn.Module], ...] = (Block,)  # activation-checkpointing / FSDP unit

    def __init__(self, backbone_id: str, image_resize_strategy: str) -> None:
        super().__init__()
        self.spec = get_vision_backbone_spec(backbone_id)
        self.identifier, self.image_resize_strategy = backbone_id, validate_resize_strategy(image_resize_strategy)
        self.keys = tuple(self.spec.featurizers)
        self.is_fused = len(self.keys) > 1
        transforms, dims, patches = [], [], set()
        for key, featurizer_spec in self.spec.featurizers.items():
            model = build_featurizer(featurizer_spec, self.spec.image_size)
            self.add_module(self.featurizer_name(key), model)
            norm = _normalization_config(model, self.spec.image_size)
            transforms.append(
                build_featurizer_transform(norm, image_resize_strategy, featurizer_spec.resize_shorter_side_to_size)
            )
            dims.append(model.embed_dim)
            patches.add(model.patch_embed.num_patches)
        if len(patches) != 1:
            raise ValueError(f"Fused featurizers of {backbone_id!r} disagree on the patch count: {sorted(patches)}.")
        self.embed_dim, self.num_patches = sum(dims), patches.pop()
        self.image_transform = ImageTransform(self.keys, transforms)
        self.requires_grad_(True)  # freezes the unused modules

    def requires_grad_(self, requires_grad: bool = True) -> "VisionBackbone":
        """Like `nn.Module.requires_grad_`, but the modules the forward never uses (`unused_modules`) always stay
        frozen: they never get a gradient, so they stay out of the optimizer and never change."""
        super().requires_grad_(requires_grad)
        for module in self.unused_modules():
            module.requires_grad_(False)
        return self

    @staticmethod
    def featurizer_name(key: str) -> str:
        return f"{key}_featurizer" if key else "featurizer"

    @property
    def featurizers(self) -> list[VisionTransformer]:
        return [getattr(self, self.featurizer_name(key)) for key in self.keys]

    def unused_modules(self) -> list[nn.Module]:
        """Per featurizer, the modules its forward never calls (`unused_featurizer_modules`), in featurizer order."""
        return [module for featurizer in self.featurizers for module in unused_featurizer_modules(featurizer)]

    def activation_checkpoint_containers(self) -> list[nn.Module]:
        """Each featurizer's blocks: containers whose items are the activation-checkpointing units (wrapped in
        place, same state-dict keys; the never-run last block's wrapper costs nothing)."""
        return [featurizer.blocks for featurizer in self.featurizers]

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP units in forward order, inner first: each featurizer's blocks, its unused tail modules (final norm,
        attention pool...: units of their own, never called, hence never all-gathered), then the featurizer itself
        (patch embedding, prefix tokens, `norm_pre`). Call after activation checkpointing, which replaces the blocks.
        """
        units: list[nn.Module] = []
        for featurizer in self.featurizers:
            units.extend(featurizer.blocks)
            units.extend(m for m in unused_featurizer_modules(featurizer) if m is not featurizer.blocks[-1])
            units.append(featurizer)
        return units

    @property
    def default_image_resolution(self) -> tuple[int, int, int]:
        return (3, self.spec.image_size, self.spec.image_size)

    def get_image_transform(self) -> ImageTransform:
        return self.image_transform

    def forward(self, pixel_values: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.is_fused:
            if isinstance(pixel_values, dict):
                raise ValueError(f"{self.identifier} takes one pixel tensor, got a dict with {sorted(pixel_values)}.")
            return self.featurizer(pixel_values)
        if not isinstance(pixel_values, dict) or set(pixel_values) != set(self.keys):
            got = sorted(pixel_values) if isinstance(pixel_values, dict) else type(pixel_values).__name__
            raise ValueError(f"{self.identifier} takes pixel values {{{', '.join(self.keys)}}}, got {got}.")
        return torch.cat([f(pixel_values[k]) for k, f in zip(self.keys, self.featurizers, strict=True)], dim=2)
