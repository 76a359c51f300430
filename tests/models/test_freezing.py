import logging

import pytest

from tests.conftest import build_tiny
from vla_train.models.freezing import STAGES, count_parameters, freeze_backbones, stage_from_flags


def _trainable_names(vlm) -> set[str]:
    return {name for name, p in vlm.named_parameters() if p.requires_grad}


def _names(vlm, prefix: str) -> set[str]:
    return {name for name, _ in vlm.named_parameters() if name.startswith(prefix)}


def _unused_vision_names(vlm) -> set[str]:
    """The never-run tail of each featurizer: last block, final norm and (SigLIP) attention pool."""
    names = set()
    for key, featurizer in zip(vlm.vision_backbone.keys, vlm.vision_backbone.featurizers, strict=True):
        last = len(featurizer.blocks) - 1
        prefix = f"vision_backbone.{vlm.vision_backbone.featurizer_name(key)}."
        names |= _names(vlm, (f"{prefix}blocks.{last}.", f"{prefix}norm.", f"{prefix}attn_pool."))
    return names


def _last_layer_names(vlm) -> set[str]:
    last = len(vlm.llm_backbone.llm.model.layers) - 1
    prefixes = ("llm_backbone.llm.model.embed_tokens.", f"llm_backbone.llm.model.layers.{last}.",
                "llm_backbone.llm.lm_head.")
    return {name for name, _ in vlm.named_parameters() if name.startswith(prefixes)}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("model_id", ["tiny-dinosiglip+tiny-llama", "tiny-dinosiglip+tiny-qwen25"])
def test_trainable_sets_per_stage(model_id, stage, caplog):
    vlm = build_tiny(model_id)
    unused = _unused_vision_names(vlm)
    vision = _names(vlm, "vision_backbone.") - unused
    projector, llm = _names(vlm, "projector."), _names(vlm, "llm_backbone.")
    last = _last_layer_names(vlm)
    expected = {
        "vla-full-train": vision | projector | llm,
        "full-finetune": vision | projector | llm,
        "vla-train": projector | llm,
        "finetune": projector | llm,
        "vla-sandwich-train": vision | projector | last,
        "vla-last-layer-train": last,
        "last-layer-finetune": last,
        "align": projector,
    }[stage]
    with caplog.at_level(logging.INFO, logger="vla_train"):
        freeze_backbones(vlm, stage)
    assert _trainable_names(vlm) == expected
    assert "llm_backbone.llm.model.norm.weight" not in _trainable_names(vlm) or stage in (
        "vla-full-train", "full-finetune", "vla-train", "finetune")
    assert vlm.vision_backbone_requires_grad == (stage in ("vla-full-train", "full-finetune", "vla-sandwich-train"))
    assert not unused & _trainable_names(vlm)
    total, trainable = count_parameters(vlm)
    assert f"{total / 1e6:.3f} total" in caplog.text and f"{trainable / 1e6:.3f} trainable" in caplog.text


def test_trainable_module_keys():
    vlm = build_tiny("tiny-siglip+tiny-llama")
    freeze_backbones(vlm, "vla-last-layer-train")
    assert vlm.trainable_module_keys == ["llm_backbone"]
    freeze_backbones(vlm, "align")
    assert vlm.trainable_module_keys == ["projector"]
    freeze_backbones(vlm, "vla-train")
    assert vlm.trainable_module_keys == ["projector", "llm_backbone"]


def test_count_parameters_counts_tied_weights_once():
    vlm = build_tiny("tiny-dinosiglip+tiny-qwen25")
    total, _ = count_parameters(vlm)
    embed = vlm.llm_backbone.llm.model.embed_tokens.weight
    with_duplicates = sum(p.numel() for _, p in vlm.named_parameters(remove_duplicate=False))
    assert total == with_duplicates - embed.numel()
    assert embed is vlm.llm_backbone.llm.lm_head.weight


def test_stage_from_flags():
    assert stage_from_flags(False, False, False) == "vla-full-train"
    assert stage_from_flags(True, False, False) == "vla-train"
    assert stage_from_flags(False, True, True) == "vla-sandwich-train"
    assert stage_from_flags(True, True, True) == "vla-last-layer-train"
    with pytest.raises(ValueError, match="freeze_llm_backbone=True needs unfreeze_last_llm_layer=True"):
        stage_from_flags(False, True, False)
    with pytest.raises(ValueError, match="only makes sense"):
        stage_from_flags(False, False, True)


def test_unknown_stage():
    with pytest.raises(ValueError, match="Unknown training stage 'pretrain'"):
        freeze_backbones(build_tiny("tiny-siglip+tiny-llama"), "pretrain")
