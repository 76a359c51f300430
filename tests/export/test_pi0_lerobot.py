"""π0 weights in LeRobot's layout: the key mapping both ways, our timm SigLIP equal to transformers' SiglipVisionModel
under the mapped keys, a save -> load round trip that predicts the same chunk, tied-head checkpoints, and clear errors
for keys that have no place or a model of other sizes."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from tests.models.test_pi0_model import pi0_inputs, tiny_pi0
from vla_train.config.model import get_model_config
from vla_train.config.policy import Pi0PolicyConfig
from vla_train.export.pi0_lerobot import EMBEDDINGS, LM_HEAD, from_lerobot, load_lerobot, save_lerobot, to_lerobot
from vla_train.models.build import build_vlm

P = "model.paligemma_with_expert.paligemma."
VISION = P + "model.vision_tower.vision_model."


def test_keys_map_to_lerobots_layout_and_back():
    state = tiny_pi0().state_dict()
    theirs = to_lerobot(state)
    assert {VISION + "embeddings.patch_embedding.weight", VISION + "encoder.layers.2.self_attn.v_proj.bias",
            VISION + "post_layernorm.weight", P + "model.multi_modal_projector.linear.weight",
            P + "model.language_model.layers.1.self_attn.k_proj.weight", P + "model.language_model.norm.weight",
            "model.paligemma_with_expert.gemma_expert.model.layers.0.mlp.gate_proj.weight",
            "model.paligemma_with_expert.gemma_expert.model.norm.weight"} <= set(theirs)
    assert theirs[VISION + "embeddings.position_embedding.weight"].shape == (64, 32)  # [P, D]
    assert {"model.state_proj.weight", "model.action_time_mlp_out.bias", "model.action_out_proj.weight"} <= set(theirs)
    assert not [key for key in theirs if ".expert." in key]  # the expert layers moved to gemma_expert
    assert theirs[LM_HEAD] is theirs[EMBEDDINGS]  # tied
    back = from_lerobot(theirs)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    no_prefix = from_lerobot({k.removeprefix("model."): v for k, v in theirs.items() if k != EMBEDDINGS})
    assert no_prefix.keys() == state.keys()  # without `model.`, embeddings from the tied head


def test_our_siglip_equals_transformers_siglip_under_the_mapped_keys():
    model = tiny_pi0()
    with torch.no_grad():  # non-trivial weights everywhere (LayerNorms start at 1 / 0)
        for param in model.vision_backbone.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.1)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                patch_size=8, image_size=64, vision_use_head=False, layer_norm_eps=1e-6,
                                hidden_act="gelu_pytorch_tanh")
    reference = SiglipVisionModel(config).eval()
    theirs = to_lerobot(model.state_dict())
    reference.load_state_dict({k.removeprefix(VISION): v for k, v in theirs.items() if k.startswith(VISION)},
                              strict=True)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.vision_backbone(pixels), reference(pixel_values=pixels).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_predicts_the_same_chunk(tmp_path):
    source, target = tiny_pi0(0), tiny_pi0(1)
    path = save_lerobot(source, tmp_path)
    inputs = pi0_inputs()
    expected = source.sample_actions(**inputs, generator=torch.Generator().manual_seed(0), num_steps=3)
    assert not torch.allclose(target.sample_actions(**inputs, generator=torch.Generator().manual_seed(0),
                                                    num_steps=3), expected)
    load_lerobot(target, tmp_path)
    torch.testing.assert_close(target.sample_actions(**inputs, generator=torch.Generator().manual_seed(0),
                                                     num_steps=3), expected, rtol=0, atol=0)
    state = load_file(str(path))
    state["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(3, 3)  # LeRobot's unused head
    state["model.unexpected.block.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not in LeRobot's π0 layout, e.g. \\['model.unexpected.block.weight'\\]"):
        load_lerobot(target, tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_lerobot(target, tmp_path / "missing")


def test_a_checkpoint_of_other_sizes_is_refused_by_name(tmp_path):
    save_lerobot(tiny_pi0(), tmp_path)
    wider = Pi0PolicyConfig(chunk_length=6, expert="tiny", action_dim=7, proprio_dim=8).build_model(
        build_vlm(get_model_config("tiny-pi0-paligemma")))
    wider.action_out_proj = torch.nn.Linear(32, 16)
    expected = "shape mismatch for 'π0.action_out_proj.bias': checkpoint \\(32,\\), model \\(16,\\)"
    with pytest.raises(ValueError, match=expected):
        load_lerobot(wider, tmp_path)
