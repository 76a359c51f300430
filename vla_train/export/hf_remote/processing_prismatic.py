"""Image processor and processor of an exported OpenVLA / Prismatic model (Hugging Face remote code).

This file is copied into every exported directory and imports only torch, numpy, PIL and transformers. The image
transform reproduces the training-time transform of each featurizer with PIL alone (same arithmetic as torchvision's
PIL path, so the tensors are bit-identical):
- `letterbox`: pad to a square, `int((max - w) / 2)` / `int((max - h) / 2)` pixels per side, fill `int(255 * mean)`;
- resize (bicubic, PIL's antialiasing): `(S, S)` for `resize-naive`; else the shorter side to `S` when
  `resize_shorter_side` (SigLIP / IN1K), or to `floor(S / crop_pct)` (timm's eval transform);
- centre crop `S`, scale to [0, 1], normalize with the featurizer's mean and std.
The per-featurizer tensors `[3, S, S]` are stacked on the channel axis: `pixel_values [B, 3k, S, S]` (float32).
"""

import math
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin

try:  # transformers 5.x
    from transformers.image_processing_base import ImageProcessingMixin
except ImportError:  # transformers 4.x
    from transformers.image_processing_utils import ImageProcessingMixin

_LEGACY_PROCESSOR = int(transformers.__version__.split(".")[0]) < 5
_PIL_INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def _resize(image: Image.Image, size: int | tuple[int, int], interpolation: int) -> Image.Image:
    """torchvision's PIL resize: an int resizes the shorter side (the longer one truncated), a pair is (h, w)."""
    width, height = image.size
    if isinstance(size, int):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_height, new_width = size
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), interpolation)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if size > width or size > height:
        raise ValueError(f"Cannot centre-crop {size} px from a {width}x{height} image.")
    top, left = round((height - size) / 2.0), round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def _letterbox(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    (width, height), side = image.size, max(image.size)
    horizontal, vertical = int((side - width) / 2), int((side - height) / 2)
    return ImageOps.expand(image, border=(horizontal, vertical, horizontal, vertical), fill=fill)


class PrismaticImageProcessor(ImageProcessingMixin):
    """PIL image(s) -> `pixel_values [B, 3k, S, S]`; one transform per featurizer (see the module docstring)."""

    model_input_names = ["pixel_values"]  # noqa: RUF012

    def __init__(
        self,
        use_fused_vision_backbone: bool = False,
        image_resize_strategy: str = "letterbox",
        input_sizes: list[list[int]] | None = None,
        interpolations: list[str] | None = None,
        means: list[list[float]] | None = None,
        stds: list[list[float]] | None = None,
        crop_pcts: list[float] | None = None,
        resize_shorter_side: list[bool] | None = None,
        **kwargs: Any,
    ) -> None:
        count = 2 if use_fused_vision_backbone else 1
        self.use_fused_vision_backbone, self.image_resize_strategy = use_fused_vision_backbone, image_resize_strategy
        self.input_sizes = [list(s) for s in (input_sizes or [[3, 224, 224]] * count)]
        self.interpolations = list(interpolations or ["bicubic"] * count)
        self.means = [list(m) for m in (means or [[0.5, 0.5, 0.5]] * count)]
        self.stds = [list(s) for s in (stds or [[0.5, 0.5, 0.5]] * count)]
        # Reference configs have neither: their processor resized the shorter side to S (crop_pct 1).
        self.crop_pcts = list(crop_pcts or [1.0] * count)
        self.resize_shorter_side = list(resize_shorter_side or [True] * count)
        for name in ("input_sizes", "interpolations", "means", "stds", "crop_pcts", "resize_shorter_side"):
            if len(getattr(self, name)) != count:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries; {count} featurizer(s) expected.")
        if image_resize_strategy not in ("resize-naive", "resize-crop", "letterbox"):
            raise ValueError(f"Unknown image_resize_strategy {image_resize_strategy!r}.")
        super().__init__(**kwargs)

    def _featurizer_transform(self, image: Image.Image, index: int) -> torch.Tensor:
        size, mean, std = self.input_sizes[index][-1], self.means[index], self.stds[index]
        interpolation = _PIL_INTERPOLATIONS[self.interpolations[index]]
        if self.image_resize_strategy == "letterbox":
            image = _letterbox(image, tuple(int(channel * 255) for channel in mean))
        if self.image_resize_strategy == "resize-naive":
            image = _resize(image, (size, size), interpolation)
        elif self.resize_shorter_side[index]:
            image = _resize(image, size, interpolation)
        else:
            image = _resize(image, math.floor(size / self.crop_pcts[index]), interpolation)
        image = _center_crop(image, size)
        tensor = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        tensor = tensor.to(dtype=torch.float32).div(255)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        return tensor.sub_(mean_t).div_(std_t)

    def apply_transform(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> `[3k, S, S]` float32."""
        return torch.vstack([self._featurizer_transform(image, i) for i in range(len(self.input_sizes))])

    def preprocess(self, images: Any, return_tensors: str | None = None, **_: Any) -> BatchFeature:
        """PIL images or uint8 `[H, W, 3]` arrays (one or a list) -> `{"pixel_values": [B, 3k, S, S]}`."""
        if not isinstance(images, list | tuple):
            images = [images]
        pil = [image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)) for image in images]
        pixel_values = torch.stack([self.apply_transform(image.convert("RGB")) for image in pil])
        return BatchFeature(data={"pixel_values": pixel_values.float().numpy()}, tensor_type=return_tensors)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)


class PrismaticProcessor(ProcessorMixin):
    """`processor(prompt, image)` -> `input_ids [B, T]`, `attention_mask [B, T]`, `pixel_values [B, 3k, S, S]` (never
    `token_type_ids`, which transformers 4.x's fast tokenizer adds by default and `predict_action` does not take)."""

    if _LEGACY_PROCESSOR:  # transformers 4.x reads the sub-processors from these class attributes
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, text: str | list[str], images: Any, padding: bool | str = False, truncation: bool | None = None,
                 max_length: int | None = None, return_tensors: str | None = "pt", **_: Any) -> BatchFeature:
        """Tokenize `text` (BOS added when the tokenizer adds it) and transform `images` (one per prompt)."""
        pixel_values = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        text_inputs = self.tokenizer(text, return_tensors=return_tensors, padding=padding, truncation=truncation,
                                     max_length=max_length, return_token_type_ids=False)
        prompts = 1 if isinstance(text, str) else len(text)
        if pixel_values.shape[0] != prompts:
            raise ValueError(f"Got {pixel_values.shape[0]} images for {prompts} prompts; pass one image per prompt.")
        return BatchFeature(data={**text_inputs, "pixel_values": pixel_values})

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))
