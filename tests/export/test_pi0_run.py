"""π0 run directories from LeRobot weights (`export/pi0_run.py`): an import rebuilds the model from the weights alone
(policy options from LeRobot's config.json), refuses to overwrite, names a missing file, and an export refuses a run of
another policy."""

import json

import pytest
import torch

from tests.models.test_pi0_model import tiny_pi0
from vla_train.config.policy import Pi0PolicyConfig, read_policy_config
from vla_train.export.oft_run import write_tiny_oft_run
from vla_train.export.pi0_lerobot import save_lerobot
from vla_train.export.pi0_run import export_pi0_run, import_pi0_lerobot
from vla_train.models.run_dir import load_run_dir

POLICY = Pi0PolicyConfig(chunk_length=6, action_dim=7, proprio_dim=8, expert="tiny")


def test_an_import_holds_the_weights_and_refuses_to_overwrite(tmp_path):
    model = tiny_pi0(3)
    save_lerobot(model, tmp_path / "lerobot")
    (tmp_path / "lerobot" / "config.json").write_text(json.dumps({"type": "pi0", "chunk_size": 6, "num_steps": 4}))
    checkpoint = import_pi0_lerobot(tmp_path / "lerobot", tmp_path / "run", model_id="tiny-pi0-paligemma",
                                    policy=POLICY)
    assert checkpoint.is_file() and read_policy_config(tmp_path / "run").chunk_length == 6
    loaded = load_run_dir(tmp_path / "run").state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in model.state_dict().items())
    with pytest.raises(FileExistsError, match="Fix: pass --overwrite true"):
        import_pi0_lerobot(tmp_path / "lerobot", tmp_path / "run", model_id="tiny-pi0-paligemma", policy=POLICY)
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        import_pi0_lerobot(tmp_path / "missing", tmp_path / "other", model_id="tiny-pi0-paligemma", policy=POLICY)
    with pytest.raises(ValueError, match=r"shape mismatch for 'π0\.action_in_proj\.bias': checkpoint \(32,\)"):
        import_pi0_lerobot(tmp_path / "lerobot", tmp_path / "wrong", model_id="tiny-pi0-paligemma",
                           policy=Pi0PolicyConfig(chunk_length=6, action_dim=7, proprio_dim=8, expert="gemma-300m"))
    assert not (tmp_path / "wrong").exists()  # every check before the first write


def test_an_export_refuses_a_run_of_another_policy(tmp_path):
    from vla_train.config.policy import OFTPolicyConfig

    run_dir = write_tiny_oft_run("tiny-siglip+tiny-llama", tmp_path / "oft", OFTPolicyConfig(chunk_length=2))
    with pytest.raises(ValueError, match="trains the 'oft' policy, not π0"):
        export_pi0_run(run_dir, tmp_path / "out", run_dir / "checkpoints" / "latest-checkpoint.pt")
