from dataclasses import dataclass, field

import draccus
import pytest

from vla_train.config.model import ModelConfig, TinyDinoSigLIPLlama, get_model_config
from vla_train.models.llm import LLM_BACKBONES
from vla_train.models.projector import projector_kind
from vla_train.models.vision import VISION_BACKBONES

EXPECTED_IDS = {
    "siglip-224px+7b": ("siglip-vit-so400m", "vicuna-v15-7b", "letterbox", "no-align+gelu-mlp"),
    "prism-dinosiglip-224px+7b": ("dinosiglip-vit-so-224px", "llama2-7b-pure", "resize-naive",
                                  "no-align+fused-gelu-mlp"),
    "prism-qwen25-extra-dinosiglip-224px+0_5b": ("dinosiglip-vit-so-224px", "qwen25-0_5b-extra", "resize-naive",
                                                 "no-align+fused-gelu-mlp"),
}


def test_reference_entries_match_facts():
    for model_id, (vision, llm, resize, arch) in EXPECTED_IDS.items():
        cfg = get_model_config(model_id)
        assert (cfg.vision_backbone_id, cfg.llm_backbone_id, cfg.image_resize_strategy, cfg.arch_specifier) == (
            vision, llm, resize, arch)
        assert cfg.llm_max_length == 2048


def test_every_entry_names_registered_components():
    for model_id in ModelConfig.get_known_choices():
        cfg = get_model_config(model_id)
        assert cfg.model_id == model_id
        assert cfg.vision_backbone_id in VISION_BACKBONES and cfg.llm_backbone_id in LLM_BACKBONES
        projector_kind(cfg.arch_specifier)


def test_cli_selects_entry_and_overrides_fields():
    @dataclass
    class Wrapper:
        model: ModelConfig = field(default_factory=TinyDinoSigLIPLlama)

    cfg = draccus.parse(Wrapper, args=["--model.type", "siglip-224px+7b", "--model.llm_max_length", "1024"])
    assert cfg.model.model_id == "siglip-224px+7b" and cfg.model.llm_max_length == 1024
    assert draccus.parse(Wrapper, args=[]).model.model_id == "tiny-dinosiglip+tiny-llama"


def test_unknown_model_id():
    with pytest.raises(ValueError, match="Unknown model id 'llava-13b'"):
        get_model_config("llava-13b")
