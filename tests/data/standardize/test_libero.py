"""LIBERO transform (`vla_train/data/standardize/libero.py`).

Structure of OpenVLA's modified LIBERO RLDS (no TFDS catalog page): steps/observation/{image, wrist_image}
(256x256x3 jpeg), state float32[8], joint_state float32[7]; steps/action float32[7]; steps/language_instruction.
"""

import numpy as np
import pytest

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.tf_setup import tf

T = 8
FLAG = Feature(dtype="bool")
LIBERO = {
    "observation": {"image": Feature(dtype="image"), "wrist_image": Feature(dtype="image"),
                    "state": Feature((8,)), "joint_state": Feature((7,))},
    "action": Feature((7,)),
    "discount": Feature(), "reward": Feature(), "is_first": FLAG, "is_last": FLAG, "is_terminal": FLAG,
    "language_instruction": Feature(dtype="string"),
    "traj_metadata": {"episode_metadata": {"file_path": Feature(dtype="string")}},
}


@pytest.mark.parametrize("name", ["libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops",
                                  "libero_10_no_noops"])
def test_libero(name):
    traj = synthetic_trajectory(LIBERO, T, instruction="put the bowl on the plate")
    action = traj["action"].numpy().copy()
    action[:, 6] = [-1.0, -1.0, 1.0, 1.0, 0.5, -0.2, 1.2, 0.0]  # -1 = open, +1 = close
    traj["action"] = tf.constant(action)
    raw = tf.nest.map_structure(lambda x: x.numpy(), traj)
    out = run_in_graph(get_standardize_transform(name), traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :6], action[:, :6])
    np.testing.assert_allclose(out["action"][:, 6], [1.0, 1.0, 0.0, 0.0, 0.5, 1.0, 0.0, 1.0])  # 1 = open
    np.testing.assert_allclose(out["observation"]["EEF_state"], raw["observation"]["state"][:, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["observation"]["state"][:, 6:8])
    assert {"image", "wrist_image"} <= set(out["observation"])
    assert out["language_instruction"].tolist() == [b"put the bowl on the plate"] * T
