"""PIL image -> normalized tensor `[3, S, S]` (float32), per vision featurizer, as the reference builds them.

The base is timm's eval transform: `Resize(floor(S / crop_pct), bicubic, shorter side) -> CenterCrop(S) -> ToTensor ->
Normalize(mean, std)`, with these reference adjustments:
- `resize-naive`: the first resize squashes to `(S, S)` (aspect ratio not kept);
- `resize-crop`: timm's transform as is, except that SigLIP and IN1K featurizers resize the shorter side to `S`
  (their crop_pct < 1 would otherwise crop the image);
- `letterbox`: pad to a square first, with `int((max - w) / 2)` / `int((max - h) / 2)` pixels on each side and the fill
  `int(255 * mean)` per channel, then as `resize-crop`.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")

_INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class NormalizationConfig:
    """What a featurizer expects: image size S, resize interpolation, crop fraction, channel mean and std."""

    image_size: int
    interpolation: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class LetterboxPad:
    """Pad a PIL image symmetrically towards a square with a constant fill (the reference's arithmetic)."""

    def __init__(self, fill: tuple[int, int, int]) -> None:
        self.fill = fill

    def __call__(self, image: Image.Image) -> Image.Image:
        (w, h), side = image.size, max(image.size)
        horizontal, vertical = int((side - w) / 2), int((side - h) / 2)
        return TF.pad(image, [horizontal, vertical, horizontal, vertical], fill=self.fill, padding_mode="constant")


def validate_resize_strategy(strategy: str) -> str:
    if strategy not in RESIZE_STRATEGIES:
        raise ValueError(f"Unknown image_resize_strategy {strategy!r}; choose one of {list(RESIZE_STRATEGIES)}.")
    return strategy


@dataclass(frozen=True)
class FeaturizerTransform:
    """One featurizer's transform split into geometry (PIL -> PIL: letterbox, resize, crop) and normalization.

    `geometry_key` identifies the geometry, so fused featurizers that resize and crop alike share that work.
    """

    geometry_key: tuple
    geometry: Callable[[Image.Image], Image.Image]
    normalize: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(to_float_tensor(self.geometry(image)))


def to_float_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> `[3, H, W]` float32 in [0, 1] (the values of torchvision's ToTensor, computed faster)."""
    return TF.pil_to_tensor(image).to(torch.float32).div_(255.0)


def build_featurizer_transform(
    norm: NormalizationConfig, strategy: str, resize_shorter_side_to_size: bool
) -> FeaturizerTransform:
    """One featurizer's transform; `resize_shorter_side_to_size` is the reference's SigLIP/IN1K no-crop fix."""
    validate_resize_strategy(strategy)
    size, interpolation = norm.image_size, _INTERPOLATIONS[norm.interpolation]
    if strategy == "resize-naive":
        resize_to: int | tuple[int, int] = (size, size)
    elif resize_shorter_side_to_size:
        resize_to = size
    else:
        resize_to = math.floor(size / norm.crop_pct)
    steps: list[Callable] = [T.Resize(resize_to, interpolation=interpolation), T.CenterCrop(size)]
    fill = tuple(int(channel * 255) for channel in norm.mean) if strategy == "letterbox" else None
    if fill is not None:
        steps.insert(0, LetterboxPad(fill))
    key = (strategy, resize_to, size, norm.interpolation, fill)
    return FeaturizerTransform(key, T.Compose(steps), T.Normalize(norm.mean, norm.std))


class ImageTransform:
    """PIL image -> `[3, S, S]` tensor (one featurizer) or `{key: [3, S, S]}` (fused featurizers)."""

    def __init__(self, keys: Sequence[str], transforms: Sequence[FeaturizerTransform]) -> None:
        self.keys, self.transforms = tuple(keys), tuple(transforms)
        self.is_fused = len(self.keys) > 1

    def __call__(self, image: Image.Image) -> torch.Tensor | dict[str, torch.Tensor]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        shared: dict[tuple, torch.Tensor] = {}
        outputs = []
        for transform in self.transforms:
            if transform.geometry_key not in shared:
                shared[transform.geometry_key] = to_float_tensor(transform.geometry(image))
            outputs.append(transform.normalize(shared[transform.geometry_key]))
        if not self.is_fused:
            return outputs[0]
        return dict(zip(self.keys, outputs, strict=True))
