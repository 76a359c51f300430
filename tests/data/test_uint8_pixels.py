"""uint8 training pixels normalized on the device are bit-equal to the float image transform (inference, export),
for every resize strategy, single and fused backbones, through the batch transform and the collator."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.test_torch_side import _frame
from vla_train.data.collator import PaddedCollatorForActionPrediction
from vla_train.data.torch_dataset import RLDSBatchTransform
from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.image_transforms import RESIZE_STRATEGIES
from vla_train.models.prompts import get_prompt_builder_class
from vla_train.models.tokenizers import build_tiny_tokenizer
from vla_train.models.vision import VisionBackbone

# single / fused, shorter-side resize (SigLIP) or crop_pct resize (CLIP, DINO); the full-size ones built on meta
BACKBONES = ["tiny-siglip-vit", "tiny-dinosiglip-vit", "clip-vit-b", "dinoclip-vit-l-336px"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    shapes = [(48, 80, 3), (97, 61, 3), (64, 64, 3), (33, 120, 4)]
    images = [Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)) for shape in shapes]
    return [*images, images[0].convert("L")]


def _backbone(backbone_id: str, strategy: str) -> VisionBackbone:
    with torch.device("meta" if not backbone_id.startswith("tiny") else "cpu"):
        return VisionBackbone(backbone_id, strategy)


def _as_list(pixels, index: int | None = None) -> list[torch.Tensor]:
    values = list(pixels.values()) if isinstance(pixels, dict) else [pixels]
    return [v if index is None else v[index] for v in values]


@pytest.mark.parametrize("strategy", RESIZE_STRATEGIES)
@pytest.mark.parametrize("backbone_id", BACKBONES)
def test_uint8_then_device_normalization_equals_the_float_transform(backbone_id, strategy):
    transform = _backbone(backbone_id, strategy).get_image_transform()
    images = _images()
    uint8 = [transform.to_uint8(image) for image in images]
    assert all(p.dtype == torch.uint8 and p.is_contiguous() for item in uint8 for p in _as_list(item))
    keys = transform.keys
    batched = {k: torch.stack([item[k] for item in uint8]) for k in keys} if transform.is_fused \
        else torch.stack(uint8)
    normalized = transform.normalize_on_device(batched)
    for index, image in enumerate(images):
        expected, got = _as_list(transform(image)), _as_list(normalized, index)
        assert all(e.dtype == g.dtype == torch.float32 and torch.equal(e, g) for e, g in zip(expected, got, strict=True))


@pytest.mark.parametrize("strategy", ["resize-naive", "letterbox"])
def test_the_training_batch_carries_uint8_and_shares_same_geometry_pixels(strategy):
    """Fused featurizers with one geometry share one uint8 tensor through the collator; others get their own."""
    transform = _backbone("tiny-dinosiglip-vit", strategy).get_image_transform()
    tokenizer = build_tiny_tokenizer("llama")
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    args = (ActionTokenizer(tokenizer), tokenizer, transform, get_prompt_builder_class("pure"))
    float_items = [RLDSBatchTransform(*args)(_frame()) for _ in range(2)]
    items = [RLDSBatchTransform(*args, uint8_pixels=True)(_frame()) for _ in range(2)]
    collate = PaddedCollatorForActionPrediction(64, tokenizer.pad_token_id)
    batch, float_batch = collate(items), collate(float_items)
    pixels = batch["pixel_values"]
    assert {p.dtype for p in pixels.values()} == {torch.uint8} and pixels["dino"].shape == (2, 64, 64, 3)
    assert (pixels["dino"] is pixels["siglip"]) == (strategy == "resize-naive")
    normalized = transform.normalize_on_device(pixels)
    assert all(torch.equal(normalized[k], float_batch["pixel_values"][k]) for k in ("dino", "siglip"))
    assert torch.equal(batch["input_ids"], float_batch["input_ids"])


def test_uint8_pixels_need_an_image_transform_and_uint8_input():
    tokenizer = build_tiny_tokenizer("llama")
    with pytest.raises(TypeError, match="to_uint8"):
        RLDSBatchTransform(ActionTokenizer(tokenizer), tokenizer, lambda image: image,
                           get_prompt_builder_class("pure"), uint8_pixels=True)
    transform = _backbone("tiny-siglip-vit", "resize-naive").get_image_transform()
    with pytest.raises(TypeError, match="uint8"):
        transform.normalize_on_device(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="one pixel tensor"):
        transform.normalize_on_device({"": torch.zeros(1, 3, 64, 64, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"channels-last pixels \[\.\.\., S, S, 3\], got shape \(1, 3, 64, 64\)"):
        transform.normalize_on_device(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))  # channels-first: refused


@pytest.mark.parametrize("strategy", RESIZE_STRATEGIES)
@pytest.mark.parametrize("backbone_id", ["tiny-siglip-vit", "tiny-dinosiglip-vit"])
def test_uint8_from_arrays_equals_the_pil_path_and_shares_what_the_geometry_keeps(backbone_id, strategy):
    """The training path hands decoded `[H, W, 3]` arrays: an image at the featurizer's size goes through without a
    copy (the geometry would return it unchanged), any other is transformed exactly as its PIL image."""
    transform = _backbone(backbone_id, strategy).get_image_transform()
    side = _as_list(transform.to_uint8(Image.new("RGB", (10, 10))))[0].shape[0]  # the featurizer's image size
    rng = np.random.default_rng(5)
    for shape in [(side, side, 3), (48, 80, 3), (side + 1, side, 3)]:
        array = rng.integers(0, 256, size=shape, dtype=np.uint8)
        from_array, from_pil = _as_list(transform.to_uint8(array)), _as_list(transform.to_uint8(Image.fromarray(array)))
        assert all(a.shape == (side, side, 3) and torch.equal(a, p) for a, p in zip(from_array, from_pil, strict=True))
        kept = shape == (side, side, 3)
        assert all(np.shares_memory(a.numpy(), array) == kept for a in from_array)
