import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vla_train.models.image_transforms import LetterboxPad
from vla_train.models.vision import VISION_BACKBONES, VisionBackbone

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# id -> (image size, embed dim, patches, {key: (mean, std)})
EXPECTED = {
    "siglip-vit-so400m": (224, 1152, 256, {"": HALF}),
    "dinov2-vit-l": (224, 1024, 256, {"": IMAGENET}),
    "dinosiglip-vit-so-224px": (224, 2176, 256, {"dino": IMAGENET, "siglip": HALF}),
    "clip-vit-l": (224, 1024, 256, {"": OPENAI_CLIP}),
    "clip-vit-l-336px": (336, 1024, 576, {"": OPENAI_CLIP}),
    "in1k-vit-l": (224, 1024, 196, {"": HALF}),
    "siglip-vit-so400m-384px": (384, 1152, 729, {"": HALF}),
    "dinosiglip-vit-so-384px": (384, 2176, 729, {"dino": IMAGENET, "siglip": HALF}),
    "dinoclip-vit-l-336px": (336, 2048, 576, {"dino": IMAGENET, "clip": OPENAI_CLIP}),
}


def _normalize_steps(backbone: VisionBackbone):
    return [transform.normalize for transform in backbone.image_transform.transforms]


@pytest.mark.parametrize("backbone_id", sorted(EXPECTED))
def test_full_size_backbones_on_meta(backbone_id):
    size, dim, patches, norms = EXPECTED[backbone_id]
    with torch.device("meta"):
        backbone = VisionBackbone(backbone_id, "resize-naive")
    assert backbone.default_image_resolution == (3, size, size)
    assert (backbone.embed_dim, backbone.num_patches) == (dim, patches)
    assert backbone.keys == tuple(norms)
    for step, (mean, std) in zip(_normalize_steps(backbone), norms.values(), strict=True):
        assert tuple(step.mean) == pytest.approx(mean) and tuple(step.std) == pytest.approx(std)
    if any(k == "" for k in norms):
        assert backbone.featurizer_name("") == "featurizer"
    else:
        assert all(hasattr(backbone, f"{k}_featurizer") for k in norms)


def test_clip_uses_quick_gelu():
    with torch.device("meta"):
        backbone = VisionBackbone("clip-vit-l", "resize-crop")
    assert type(backbone.featurizer.blocks[0].mlp.act).__name__ == "QuickGELU"


def test_penultimate_block_features_without_prefix_tokens_or_norm():
    backbone = VisionBackbone("tiny-dinosiglip-vit", "resize-naive").eval()
    dino = backbone.dino_featurizer
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = dino.norm_pre(dino._pos_embed(dino.patch_embed(x)))
        for block in dino.blocks[:-1]:  # through block depth - 2
            tokens = block(tokens)
        expected = tokens[:, dino.num_prefix_tokens :]
        got = backbone({"dino": x, "siglip": x})
    assert dino.num_prefix_tokens == 5  # CLS + 4 registers removed
    assert got.shape == (2, 64, 64)
    torch.testing.assert_close(got[..., :32], expected, rtol=0, atol=0)


def test_fused_forward_concatenates_and_validates_keys():
    backbone = VisionBackbone("tiny-dinosiglip-vit", "resize-naive")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused = backbone({"dino": x, "siglip": x})
        torch.testing.assert_close(fused[..., 32:], backbone.siglip_featurizer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dino, siglip"):
        backbone(x)
    single = VisionBackbone("tiny-siglip-vit", "letterbox")
    with pytest.raises(ValueError, match="one pixel tensor"):
        single({"siglip": x})


def test_unknown_ids_raise():
    with pytest.raises(ValueError, match="Unknown vision backbone 'vit-huge'"):
        VisionBackbone("vit-huge", "resize-naive")
    with pytest.raises(ValueError, match="Unknown image_resize_strategy 'squash'"):
        VisionBackbone("tiny-siglip-vit", "squash")


def _manual(image: Image.Image, size: tuple[int, int], mean, std, crop: int | None = None) -> torch.Tensor:
    from torchvision.transforms import functional as F

    out = F.resize(image, size, interpolation=F.InterpolationMode.BICUBIC)
    if crop is not None:
        out = F.center_crop(out, [crop, crop])
    return F.normalize(F.to_tensor(out), mean, std)


def test_resize_naive_squashes_to_square(rgb_image):
    backbone = VisionBackbone("tiny-dinosiglip-vit", "resize-naive")
    out = backbone.image_transform(rgb_image)
    assert set(out) == {"dino", "siglip"}
    torch.testing.assert_close(out["dino"], _manual(rgb_image, [64, 64], *IMAGENET))
    torch.testing.assert_close(out["siglip"], _manual(rgb_image, [64, 64], *HALF))


def test_resize_crop_matches_timm_eval_transform_except_siglip_fix(rgb_image):
    backbone = VisionBackbone("tiny-dinosiglip-vit", "resize-crop")
    out = backbone.image_transform(rgb_image)
    timm_transform = timm.data.create_transform(
        **{**timm.data.resolve_model_data_config(backbone.dino_featurizer), "input_size": (3, 64, 64)},
        is_training=False,
    )
    torch.testing.assert_close(out["dino"], timm_transform(rgb_image))
    # SigLIP (crop_pct 0.9) resizes the shorter side to S instead of S / 0.9, so less is cropped.
    torch.testing.assert_close(out["siglip"], _manual(rgb_image, 64, *HALF, crop=64))


def test_letterbox_pads_with_mean_fill(rgb_image):
    backbone = VisionBackbone("tiny-siglip-vit", "letterbox")
    out = backbone.image_transform(rgb_image)  # 80x48 -> padded to 80x80 with fill 127
    assert out.shape == (3, 64, 64)
    fill = (127 / 255 - 0.5) / 0.5
    torch.testing.assert_close(out[:, 0, :], torch.full((3, 64), fill), rtol=0, atol=1e-6)
    padded = LetterboxPad((127, 127, 127))(rgb_image)
    assert padded.size == (80, 80)
    assert np.asarray(padded)[0, 0].tolist() == [127, 127, 127]
    torch.testing.assert_close(out, _manual(padded, 64, *HALF, crop=64))


def test_letterbox_keeps_reference_arithmetic_for_odd_padding():
    odd = Image.new("RGB", (10, 7))
    assert LetterboxPad((0, 0, 0))(odd).size == (10, 9)  # int(3 / 2) = 1 pixel on each side, as the reference


def test_grayscale_images_are_converted(rgb_image):
    backbone = VisionBackbone("tiny-siglip-vit", "resize-naive")
    assert backbone.image_transform(rgb_image.convert("L")).shape == (3, 64, 64)


def test_registry_covers_reference_ids():
    reference_ids = {"siglip-vit-so400m", "dinov2-vit-l", "dinosiglip-vit-so-224px", "clip-vit-l", "clip-vit-l-336px",
                     "in1k-vit-l", "siglip-vit-so400m-384px", "dinosiglip-vit-so-384px", "dinoclip-vit-l-336px"}
    assert reference_ids <= set(VISION_BACKBONES)


def test_siglip_featurizers_pin_the_reference_weights_tag():
    # timm 1.0 defaults these architectures to SigLIP-2 weights; the reference trained on the original WebLI ones.
    for backbone_id in ("siglip-vit-so400m", "siglip-vit-so400m-384px", "dinosiglip-vit-so-224px"):
        specs = VISION_BACKBONES[backbone_id].featurizers
        assert all(s.timm_id.endswith((".webli", ".lvd142m")) for s in specs.values()), backbone_id


def test_fused_featurizers_share_geometry_and_match_torchvision(rgb_image):
    from torchvision import transforms as T

    backbone = VisionBackbone("tiny-dinosiglip-vit", "resize-naive")
    keys = {t.geometry_key for t in backbone.image_transform.transforms}
    assert len(keys) == 1  # both featurizers resize alike: the work is done once
    out = backbone.image_transform(rgb_image)
    for key, transform in zip(("dino", "siglip"), backbone.image_transform.transforms, strict=True):
        reference = T.Compose([transform.geometry, T.ToTensor(), transform.normalize])(rgb_image)
        assert torch.equal(out[key], reference)
    letterbox = VisionBackbone("tiny-dinosiglip-vit", "letterbox")
    assert len({t.geometry_key for t in letterbox.image_transform.transforms}) == 2  # different fills


def test_paligemmas_siglip_returns_final_norm_features_and_has_no_unused_modules():
    backbone = VisionBackbone("tiny-paligemma-siglip", "resize-naive")
    featurizer = backbone.featurizer
    assert backbone.unused_modules() == [] and getattr(featurizer, "attn_pool", None) is None
    assert all(p.requires_grad for p in backbone.parameters())  # every block and the final norm are used
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = featurizer.norm(featurizer.blocks(featurizer._pos_embed(featurizer.patch_embed(pixels))))
        torch.testing.assert_close(backbone(pixels), expected)
    assert backbone.fsdp_units() == [*featurizer.blocks, featurizer]
