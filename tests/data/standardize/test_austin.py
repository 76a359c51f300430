"""UT Austin transforms on synthetic trajectories with the TFDS catalog's feature structures."""

import numpy as np
import pytest

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.tf_setup import tf

T = 10
GRIPPER = np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, -2.0, 0.75, 1.0], np.float32)  # raw: +1 close, -1 open
INSTRUCTION = "put the bowl on the plate"


def rlds_steps(observation: dict, **extra) -> dict:
    """The step features every catalog page below shares, plus the dataset's observation (and extra) features."""
    return {"action": Feature((7,)), "discount": Feature(), "is_first": Feature(dtype="bool"),
            "is_last": Feature(dtype="bool"), "is_terminal": Feature(dtype="bool"),
            "language_embedding": Feature((512,)), "language_instruction": Feature(dtype="string"),
            "observation": observation, "reward": Feature(), **extra}


BUDS = rlds_steps({"image": Feature(dtype="image"), "state": Feature((24,)), "wrist_image": Feature(dtype="image")})
SAILOR = rlds_steps({"image": Feature(dtype="image"), "state": Feature((8,)), "state_ee": Feature((16,)),
                     "state_gripper": Feature((1,)), "state_joint": Feature((7,)),
                     "wrist_image": Feature(dtype="image")})
SIRIUS = rlds_steps({"image": Feature(dtype="image"), "state": Feature((8,)), "state_ee": Feature((16,)),
                     "state_gripper": Feature((1,)), "state_joint": Feature((7,)),
                     "wrist_image": Feature(dtype="image")},
                    action_mode=Feature((1,)), intv_label=Feature((1,)))


def make(structure: dict) -> dict:
    traj = synthetic_trajectory(structure, length=T, instruction=INSTRUCTION)
    action = traj["action"].numpy().copy()
    action[:, -1] = GRIPPER
    traj["action"] = tf.constant(action)
    return traj


def check_clip_invert(traj: dict, out: dict) -> None:
    check_standardized(out, T)
    raw = traj["action"].numpy()
    np.testing.assert_allclose(out["action"][:, :6], raw[:, :6])
    np.testing.assert_allclose(out["action"][:, 6], 1.0 - np.clip(GRIPPER, 0.0, 1.0))
    assert out["action"][0, 6] == 1.0 and out["action"][5, 6] == 0.0  # -1 (open) -> 1, +1 (close) -> 0
    assert set(out["language_instruction"].tolist()) == {INSTRUCTION.encode()}


def test_austin_buds():
    traj = make(BUDS)
    out = run_in_graph(get_standardize_transform("austin_buds_dataset_converted_externally_to_rlds"), traj)
    check_clip_invert(traj, out)
    assert out["observation"]["state"].shape == (T, 8)  # config: state_obs_keys ["state"] (7 joints + gripper)
    np.testing.assert_allclose(out["observation"]["state"], traj["observation"]["state"].numpy()[:, :8])
    assert set(out["observation"]) >= {"image", "wrist_image"}


@pytest.mark.parametrize("name, structure", [("austin_sailor_dataset_converted_externally_to_rlds", SAILOR),
                                             ("austin_sirius_dataset_converted_externally_to_rlds", SIRIUS)])
def test_austin_sailor_sirius(name, structure):
    traj = make(structure)
    out = run_in_graph(get_standardize_transform(name), traj)
    check_clip_invert(traj, out)
    np.testing.assert_allclose(out["observation"]["state"], traj["observation"]["state"].numpy())  # 8-D, unchanged
    assert set(out["observation"]) >= {"image", "wrist_image"}
