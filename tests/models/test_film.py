import copy

import pytest
import torch
from timm.models.vision_transformer import Block
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from vla_train.export.oft_keys import from_oft_state_dict, to_oft_state_dict
from vla_train.models.oft.film import (
    FiLMedBlock,
    FiLMedVisionBackbone,
    apply_film,
    average_language_embedding,
)
from vla_train.models.vision import VisionBackbone

LLM_DIM, B, L = 12, 2, 5
IDS = ["tiny-siglip-vit", "tiny-dinosiglip-vit"]


def _backbone(backbone_id: str) -> VisionBackbone:
    torch.manual_seed(0)
    return VisionBackbone(backbone_id, "resize-naive").eval()


def _inputs(backbone: VisionBackbone) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    size = backbone.spec.image_size
    images = {key: torch.randn(B, 3, size, size, generator=generator) for key in backbone.keys}
    pixels = images if backbone.is_fused else images[""]
    return pixels, torch.randn(B, L, LLM_DIM, generator=generator)


@pytest.mark.parametrize("backbone_id", IDS)
def test_zero_init_film_is_identity(backbone_id):
    plain = _backbone(backbone_id)
    film = apply_film(copy.deepcopy(plain), LLM_DIM, zero_init=True)
    assert isinstance(film, FiLMedVisionBackbone) and film.llm_dim == LLM_DIM
    pixels, language = _inputs(plain)
    expected = plain(pixels)
    assert expected.shape == (B, plain.num_patches, plain.embed_dim)
    torch.testing.assert_close(film(pixels, language), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backbone_id", IDS)
def test_film_changes_output_and_matches_block_formula(backbone_id):
    film = apply_film(_backbone(backbone_id), LLM_DIM)  # PyTorch's default Linear init, as OFT
    pixels, language = _inputs(film)
    plain_out = apply_film(_backbone(backbone_id), LLM_DIM, zero_init=True)(pixels, language)
    assert (film(pixels, language) - plain_out).abs().max() > 1e-3
    other = language + torch.randn_like(language)
    assert (film(pixels, other) - film(pixels, language)).abs().max() > 1e-3  # the condition matters

    wrapped: FiLMedBlock = film.featurizers[0].blocks[0]
    x, condition = torch.randn(B, 7, film.featurizers[0].embed_dim), language.mean(dim=1)
    block = wrapped.block
    y = x + block.ls1(block.attn(block.norm1(x)))
    y = y * (1 + wrapped.scale(condition)[:, None]) + wrapped.shift(condition)[:, None]
    torch.testing.assert_close(wrapped(x, condition), y + block.ls2(block.mlp(block.norm2(y))))


def test_keys_and_oft_mapping():
    plain = _backbone("tiny-dinosiglip-vit")
    film = apply_film(copy.deepcopy(plain), LLM_DIM)
    keys, plain_keys = set(film.state_dict()), set(plain.state_dict())
    assert "dino_featurizer.blocks.0.block.ls1.gamma" in keys and "dino_featurizer.blocks.0.ls1.gamma" in plain_keys
    film_keys = {f"{f}_featurizer.blocks.{i}.{m}.{p}" for f in ("dino", "siglip") for i in range(3)
                 for m in ("scale", "shift") for p in ("weight", "bias")}
    renamed = {_insert_block(k) for k in plain_keys}
    assert keys == renamed | film_keys
    assert film.state_dict()["siglip_featurizer.blocks.1.scale.weight"].shape == (32, LLM_DIM)

    oft = to_oft_state_dict(film)
    for key in ("vision_backbone.featurizer.blocks.0.block.norm1.weight",
                "vision_backbone.featurizer.blocks.2.block.ls2.scale_factor",  # DINO LayerScale, HF name
                "vision_backbone.featurizer.blocks.0.scale.weight",
                "vision_backbone.fused_featurizer.blocks.1.shift.bias",
                "vision_backbone.fused_featurizer.blocks.0.block.attn.qkv.weight"):
        assert key in oft, key
    assert len(oft) == len(keys)
    restored = apply_film(copy.deepcopy(plain), LLM_DIM, zero_init=True)
    restored.load_state_dict(from_oft_state_dict(oft, film.keys), strict=True)
    pixels, language = _inputs(film)
    torch.testing.assert_close(restored(pixels, language), film(pixels, language))


def _insert_block(key: str) -> str:
    head, sep, rest = key.partition(".blocks.")
    if not sep:
        return key
    index, _, tail = rest.partition(".")
    return f"{head}.blocks.{index}.block.{tail}"


@pytest.mark.parametrize("zero_init", [True, False])
def test_gradients_reach_film_params_and_last_block_stays_frozen(zero_init):
    film = apply_film(_backbone("tiny-dinosiglip-vit"), LLM_DIM, zero_init=zero_init)
    pixels, language = _inputs(film)
    language.requires_grad_(True)
    film(pixels, language).square().sum().backward()
    for featurizer in film.featurizers:
        for block in list(featurizer.blocks)[:-1]:
            for param in (block.scale.weight, block.scale.bias, block.shift.weight, block.shift.bias):
                assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0
        last = featurizer.blocks[-1]
        assert not any(p.requires_grad for p in last.parameters()) and last.scale.weight.grad is None
    # zero-init scale/shift still learn (above); the condition gets a gradient once they are non-zero
    assert (language.grad.abs().sum() > 0) != zero_init
    assert len(film.film_parameters()) == 2 * 3 * 4


def test_activation_checkpointing_matches_plain_gradients():
    reference = apply_film(_backbone("tiny-siglip-vit"), LLM_DIM)
    checkpointed = copy.deepcopy(reference)
    for container in checkpointed.activation_checkpoint_containers():
        for index, block in enumerate(container):
            container[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                  preserve_rng_state=False)
    assert set(checkpointed.state_dict()) == set(reference.state_dict())
    pixels, language = _inputs(reference)
    for model in (reference, checkpointed):
        model(pixels, language).square().mean().backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert any(".scale." in n for n in grads)
    for name, param in checkpointed.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_average_language_embedding_with_mask():
    embeddings = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    torch.testing.assert_close(average_language_embedding(embeddings), embeddings.mean(dim=1))
    mask = torch.tensor([[True, True, False], [False, False, True]])
    expected = torch.stack([embeddings[0, :2].mean(dim=0), embeddings[1, 2]])
    torch.testing.assert_close(average_language_embedding(embeddings, mask), expected)


def test_apply_film_refuses_twice_and_wrapped_blocks():
    film = apply_film(_backbone("tiny-siglip-vit"), LLM_DIM)
    assert all(isinstance(b, FiLMedBlock) and isinstance(b.block, Block) for b in film.featurizer.blocks)
    assert film.fsdp_unit_classes == (FiLMedBlock,)
    with pytest.raises(ValueError, match="already has FiLM"):
        apply_film(film, LLM_DIM)
    wrapped = _backbone("tiny-siglip-vit")
    wrapped.featurizer.blocks[0] = checkpoint_wrapper(wrapped.featurizer.blocks[0])
    with pytest.raises(TypeError, match="before checkpoint wrappers"):
        apply_film(wrapped, LLM_DIM)
