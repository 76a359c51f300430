import json
import re

import pytest
import torch

from tests.conftest import TINY_MODEL_IDS, batch_pixels, build_tiny
from vla_train.config.model import CustomModelConfig, get_model_config, model_config_from_fields
from vla_train.models.build import build_vlm
from vla_train.models.llm import LLM_BACKBONES
from vla_train.models.run_dir import (
    load_base_vlm,
    load_run_dir,
    make_base_vlm_run_dir,
    read_model_config,
    save_base_vlm,
)


def _logits(vlm, image):
    tokenizer = vlm.llm_backbone.get_tokenizer()
    input_ids = torch.tensor([tokenizer("In: What action should the robot take?\nOut: ").input_ids])
    with torch.no_grad():
        return vlm(input_ids=input_ids, pixel_values=batch_pixels(vlm, image)).logits


def _perturb(vlm):
    """Move every weight away from its seeded initialization, so a load that silently re-initializes fails."""
    with torch.no_grad():
        for p in vlm.parameters():
            p.add_(torch.randn_like(p) * 0.01)


@pytest.mark.parametrize("model_id", TINY_MODEL_IDS)
def test_run_dir_round_trip_gives_identical_logits_in_fp32(model_id, tmp_path, rgb_image):
    vlm = build_tiny(model_id).eval()
    _perturb(vlm)
    ckpt = save_base_vlm(vlm, get_model_config(model_id), tmp_path)
    assert ckpt == tmp_path / "checkpoints" / "latest-checkpoint.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert sorted(saved["model"]) == ["llm_backbone", "projector", "vision_backbone"]
    assert any(k.startswith("llm.model.layers.0.") for k in saved["model"]["llm_backbone"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["model_id"] == model_id and next(iter(config["model"])) == "type"

    loaded = load_base_vlm(tmp_path).eval()
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(_logits(loaded, rgb_image), _logits(vlm, rgb_image))


def test_bf16_vision_weights_load_as_fp32(tmp_path, rgb_image):
    model_id = "tiny-siglip+tiny-llama"
    vlm = build_tiny(model_id).eval()
    vlm.vision_backbone.to(torch.bfloat16)  # the reference saves a frozen, bf16-cast vision backbone like this
    save_base_vlm(vlm, get_model_config(model_id), tmp_path)
    loaded = load_base_vlm(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    expected = vlm.vision_backbone.featurizer.patch_embed.proj.weight.float()
    assert torch.equal(loaded.vision_backbone.featurizer.patch_embed.proj.weight, expected)


def test_reference_checkpoint_without_vision_weights_loads_tiny(tmp_path):
    model_id = "tiny-siglip+tiny-llama"
    vlm = build_tiny(model_id)
    save_base_vlm(vlm, get_model_config(model_id), tmp_path)
    ckpt = tmp_path / "checkpoints" / "latest-checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["model"]["vision_backbone"]
    torch.save(state, ckpt)
    loaded = load_base_vlm(tmp_path)
    assert torch.equal(loaded.projector.projector[0].weight, vlm.projector.projector[0].weight)


def test_missing_run_dir_and_unknown_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run directory nor a registered model id"):
        load_base_vlm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "config.json")):
        load_base_vlm(tmp_path / "empty")


def test_missing_checkpoint_file(tmp_path):
    save_base_vlm(build_tiny("tiny-siglip+tiny-llama"), get_model_config("tiny-siglip+tiny-llama"), tmp_path)
    (tmp_path / "checkpoints" / "latest-checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match="latest-checkpoint.pt does not exist"):
        load_base_vlm(tmp_path)


def test_missing_key_and_shape_mismatch_name_key_and_shapes(tmp_path):
    model_id = "tiny-siglip+tiny-llama"
    save_base_vlm(build_tiny(model_id), get_model_config(model_id), tmp_path)
    ckpt = tmp_path / "checkpoints" / "latest-checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)

    no_projector = {"model": {k: v for k, v in state["model"].items() if k != "projector"}}
    torch.save(no_projector, ckpt)
    with pytest.raises(ValueError, match="lacks the required key 'model.projector'"):
        load_base_vlm(tmp_path)

    bad_shape = {"model": {**state["model"], "projector": dict(state["model"]["projector"])}}
    bad_shape["model"]["projector"]["projector.0.weight"] = torch.zeros(3, 3)
    torch.save(bad_shape, ckpt)
    with pytest.raises(ValueError, match=r"'projector.projector.0.weight': checkpoint \(3, 3\), model \(64, 32\)"):
        load_base_vlm(tmp_path)

    missing_tensor = {"model": {**state["model"], "llm_backbone": dict(state["model"]["llm_backbone"])}}
    del missing_tensor["model"]["llm_backbone"]["llm.lm_head.weight"]
    torch.save(missing_tensor, ckpt)
    with pytest.raises(ValueError, match=r"missing keys \['llm.lm_head.weight'\]"):
        load_base_vlm(tmp_path)


def test_config_without_model_section(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vla": {}}))
    with pytest.raises(ValueError, match="needs a 'model' section"):
        read_model_config(tmp_path)


def test_registry_ids_tiny_builds_full_size_needs_a_zoo(tmp_path, monkeypatch):
    monkeypatch.delenv("VLA_TRAIN_MODEL_ZOO", raising=False)
    vlm = load_base_vlm("tiny-dinosiglip+tiny-llama")
    assert vlm.model_id == "tiny-dinosiglip+tiny-llama"
    with pytest.raises(FileNotFoundError, match="VLA_TRAIN_MODEL_ZOO"):
        load_base_vlm("prism-dinosiglip-224px+7b")
    # a run directory in the zoo is found by id
    make_base_vlm_run_dir(get_model_config("tiny-siglip+tiny-llama"), tmp_path / "tiny-siglip+tiny-llama")
    monkeypatch.setenv("VLA_TRAIN_MODEL_ZOO", str(tmp_path))
    assert load_base_vlm("tiny-siglip+tiny-llama").model_id == "tiny-siglip+tiny-llama"


def test_make_base_vlm_run_dir_refuses_to_overwrite(tmp_path):
    cfg = get_model_config("tiny-siglip+tiny-llama")
    make_base_vlm_run_dir(cfg, tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite true"):
        make_base_vlm_run_dir(cfg, tmp_path)
    make_base_vlm_run_dir(cfg, tmp_path, overwrite=True)
    assert not list(tmp_path.rglob("*.tmp*"))


def test_load_specific_checkpoint_as_vla(tmp_path, rgb_image):
    from tests.conftest import NORM_STATS

    model_id = "tiny-dinosiglip+tiny-llama"
    vlm = build_tiny(model_id, vla=True)
    save_base_vlm(vlm, get_model_config(model_id), tmp_path)
    other = tmp_path / "checkpoints" / "step-000010-epoch-00-loss=1.0000.pt"
    (tmp_path / "checkpoints" / "latest-checkpoint.pt").rename(other)
    loaded = load_run_dir(tmp_path, vla=True, norm_stats=NORM_STATS, checkpoint=other)
    assert loaded.predict_action(rgb_image, "wave").shape == (7,)


def test_full_size_checkpoint_without_vision_weights_names_the_download(tmp_path, monkeypatch):
    import vla_train.models.run_dir as run_dir_module

    with torch.device("meta"):
        vlm = build_vlm(get_model_config("siglip-224px+7b"))
    monkeypatch.setattr(run_dir_module, "try_to_load_from_cache", lambda repo, filename: None)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download timm/vit_so400m_patch14_siglip_224.webli"):
        run_dir_module.load_pretrained_featurizers(vlm, tmp_path / "ckpt.pt")


def test_vla_run_dir_resolves_its_base_vlm(tmp_path):
    base = tmp_path / "base"
    make_base_vlm_run_dir(get_model_config("tiny-siglip+tiny-llama"), base)
    by_path, by_id = tmp_path / "vla_path", tmp_path / "vla_id"
    for run_dir, base_vlm in ((by_path, str(base)), (by_id, "tiny-dinosiglip+tiny-llama")):
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps({"vla": {"type": "x", "base_vlm": base_vlm}}))
    assert read_model_config(by_path).model_id == "tiny-siglip+tiny-llama"
    assert read_model_config(by_id).model_id == "tiny-dinosiglip+tiny-llama"


def test_a_custom_model_with_its_own_llm_config_round_trips(tmp_path, rgb_image):
    """A vision/LLM combination no registered ModelConfig has, with an LLM outside the registry (sizes, rms_norm_eps):
    the run directory records `llm_config`, and loading it rebuilds the same architecture and logits."""
    llm_config = {**LLM_BACKBONES["tiny-qwen25"].architecture, "model_type": "qwen2", "hidden_size": 32,
                  "num_hidden_layers": 3, "rms_norm_eps": 1e-5}
    model_cfg = CustomModelConfig("my-siglip+qwen", "no-align+gelu-mlp", "tiny-siglip-vit", "tiny-qwen25",
                                  "letterbox", 256, llm_config=llm_config)
    vlm = build_vlm(model_cfg).eval()
    _perturb(vlm)
    save_base_vlm(vlm, model_cfg, tmp_path)
    section = json.loads((tmp_path / "config.json").read_text())["model"]
    assert section["type"] == "my-siglip+qwen" and section["llm_config"] == llm_config
    assert read_model_config(tmp_path) == model_cfg and isinstance(read_model_config(tmp_path), CustomModelConfig)
    reloaded = load_base_vlm(tmp_path).eval()
    config = reloaded.llm_backbone.llm.config
    assert (config.hidden_size, config.num_hidden_layers, config.rms_norm_eps) == (32, 3, 1e-5)
    assert torch.equal(_logits(reloaded, rgb_image), _logits(vlm, rgb_image))


def test_model_config_from_fields():
    registered = model_config_from_fields({"type": "x", "model_id": "tiny-siglip+tiny-llama", "llm_max_length": 64})
    assert type(registered) is type(get_model_config("tiny-siglip+tiny-llama")) and registered.llm_max_length == 64
    with pytest.raises(ValueError, match=r"'mine' is not registered and lacks \['arch_specifier'"):
        model_config_from_fields({"model_id": "mine", "vision_backbone_id": "tiny-siglip-vit"})


def test_a_truncated_checkpoint_is_named(tmp_path):
    model_cfg = get_model_config("tiny-siglip+tiny-llama")
    checkpoint = save_base_vlm(build_vlm(model_cfg), model_cfg, tmp_path / "base")
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    expected = rf"{re.escape(str(checkpoint))} is not a readable torch checkpoint .*truncated"
    with pytest.raises(ValueError, match=expected):
        load_run_dir(tmp_path / "base")
