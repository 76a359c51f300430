"""PIL image -> normalized tensor `[3, S, S]` (float32), per vision featurizer, as the reference builds them.

Training splits the transform in two: `ImageTransform.to_uint8` (host: geometry only, channels-last `[S, S, 3]` uint8;
an image the geometry would leave unchanged is not touched at all) and `ImageTransform.normalize_on_device` (after the
host-to-device copy: channels first, float conversion and mean/std), which together give exactly the float tensor of
`ImageTransform.__call__` (the inference and export path).

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

Pixels = torch.Tensor | dict[str, torch.Tensor]
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
    normalize: T.Normalize
    _stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)
    _keeps: dict[tuple[int, int], bool] = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(to_float_tensor(self.geometry(image)))

    def keeps(self, height: int, width: int) -> bool:
        """Whether the geometry returns an RGB image of this size unchanged (then the host skips it: no PIL round
        trip, no copy). Decided once per size by running the geometry on a random probe image."""
        if (height, width) not in self._keeps:
            probe = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            out = np.asarray(self.geometry(Image.fromarray(probe)))
            self._keeps[(height, width)] = out.shape == probe.shape and bool(np.array_equal(out, probe))
        return self._keeps[(height, width)]

    def normalize_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """Channels-last uint8 `[..., S, S, 3]` on any device -> float32 `[..., 3, S, S]` normalized on that device,
        bit-equal to `__call__`'s `ToTensor -> Normalize` (same float32 ops in the same order; mean/std cached per
        device: no sync)."""
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalize_uint8 takes uint8 pixels, got {pixels.dtype}.")
        if pixels.dim() < 3 or pixels.shape[-1] != 3:
            raise ValueError(f"normalize_uint8 takes channels-last pixels [..., S, S, 3], got shape "
                             f"{tuple(pixels.shape)}.")
        pixels = pixels.movedim(-1, -3).contiguous()
        if pixels.device not in self._stats:
            self._stats[pixels.device] = tuple(  # type: ignore[assignment]
                torch.as_tensor(v, dtype=torch.float32).view(-1, 1, 1).to(pixels.device)
                for v in (self.normalize.mean, self.normalize.std))
        mean, std = self._stats[pixels.device]
        return pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)


class CenterCropOrKeep(T.CenterCrop):
    """torchvision's CenterCrop, except that an image already of the crop size is returned as is (PIL's crop would
    copy it: ~0.1 ms per frame for the same pixels)."""

    def forward(self, img: Any) -> Any:
        if isinstance(img, Image.Image) and img.size == (self.size[1], self.size[0]):
            return img
        return super().forward(img)


def to_float_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> `[3, H, W]` float32 in [0, 1] (the values of torchvision's ToTensor, computed faster)."""
    return TF.pil_to_tensor(image).to(torch.float32).div_(255.0)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> channels-last `[H, W, 3]` uint8 (numpy only: no torch op, so no intra-op thread pool)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


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
    steps: list[Callable] = [T.Resize(resize_to, interpolation=interpolation), CenterCropOrKeep(size)]
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

    def to_uint8(self, image: Image.Image | np.ndarray) -> torch.Tensor | dict[str, torch.Tensor]:
        """PIL image or `[H, W, 3]` uint8 array -> channels-last `[S, S, 3]` uint8 after each featurizer's geometry
        (or `{key: [S, S, 3]}`); featurizers with the same geometry get the same tensor object (the collator and the
        device copy then move it once). An array the geometry keeps is shared, not copied
        (`FeaturizerTransform.keeps`)."""
        array = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 \
            and image.shape[2] == 3 else None
        if array is None:
            image = image if isinstance(image, Image.Image) else Image.fromarray(image)
            if image.mode != "RGB":
                image = image.convert("RGB")
        shared: dict[tuple, torch.Tensor] = {}
        for transform in self.transforms:
            if transform.geometry_key in shared:
                continue
            if array is not None and transform.keeps(*array.shape[:2]):
                shared[transform.geometry_key] = torch.from_numpy(array)
            else:
                pil = Image.fromarray(array) if array is not None else image
                shared[transform.geometry_key] = to_uint8_tensor(transform.geometry(pil))
        outputs = [shared[transform.geometry_key] for transform in self.transforms]
        return outputs[0] if not self.is_fused else dict(zip(self.keys, outputs, strict=True))

    def normalize_on_device(self, pixels: Pixels) -> Pixels:
        """`to_uint8`'s output, collated (`[B, 3, S, S]` uint8, or a dict of them) and on the training device ->
        float32 on that device, exactly the values `__call__` gives per image."""
        if not self.is_fused:
            if isinstance(pixels, dict):
                raise ValueError(f"Expected one pixel tensor, got a dict with {sorted(pixels)}.")
            return self.transforms[0].normalize_uint8(pixels)
        if not isinstance(pixels, dict) or set(pixels) != set(self.keys):
            raise ValueError(f"Expected pixel tensors for {list(self.keys)}, got "
                             f"{sorted(pixels) if isinstance(pixels, dict) else type(pixels).__name__}.")
        pairs = zip(self.keys, self.transforms, strict=True)
        return {key: transform.normalize_uint8(pixels[key]) for key, transform in pairs}
