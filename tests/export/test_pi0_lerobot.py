"""π0 weights in LeRobot's layout: the key mapping both ways, a save -> load round trip that predicts the same chunk,
tied-head checkpoints, and clear errors for keys that have no place or a model of other sizes."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.test_pi0_model import _inputs
from vla_train.export.pi0_lerobot import EMBEDDINGS, LM_HEAD, from_lerobot, load_lerobot, save_lerobot, to_lerobot
from vla_train.models.pi0.model import Pi0Model, pi0_architecture

P = "model.paligemma_with_expert.paligemma."


def _tiny(seed: int) -> Pi0Model:
    torch.manual_seed(seed)
    return Pi0Model(pi0_architecture("tiny")).eval()


def test_keys_map_to_lerobots_layout_and_back():
    state = _tiny(0).state_dict()
    theirs = to_lerobot(state)
    assert P + "model.vision_tower.vision_model.embeddings.patch_embedding.weight" in theirs
    assert P + "model.multi_modal_projector.linear.weight" in theirs
    assert P + "model.language_model.layers.1.self_attn.k_proj.weight" in theirs
    assert "model.paligemma_with_expert.gemma_expert.model.layers.0.mlp.gate_proj.weight" in theirs
    assert {"model.state_proj.weight", "model.action_time_mlp_out.bias", "model.action_out_proj.weight"} <= set(theirs)
    assert theirs[LM_HEAD] is theirs[EMBEDDINGS]  # tied
    back = from_lerobot(theirs)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
    no_prefix = from_lerobot({k.removeprefix("model."): v for k, v in theirs.items() if k != EMBEDDINGS})
    assert no_prefix.keys() == state.keys()  # without `model.`, embeddings from the tied head


def test_save_load_round_trip_predicts_the_same_chunk(tmp_path):
    source, target = _tiny(0), _tiny(1)
    path = save_lerobot(source, tmp_path)
    inputs = _inputs(source)
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
    save_lerobot(_tiny(0), tmp_path)
    architecture = pi0_architecture("tiny")
    architecture.expert.num_hidden_layers = 1
    architecture.vlm.num_hidden_layers = 1
    with pytest.raises(ValueError, match="does not fit this π0 architecture: missing \\[\\] \\(0\\), unexpected"):
        load_lerobot(Pi0Model(architecture), tmp_path)
