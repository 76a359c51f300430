"""T-DROID transform (`vla_train/data/standardize/tdroid.py`).

No TFDS catalog page: the structure follows the reference config (primary `static_image`, depth
`static_depth_image`) and the RLDS builder of the same DROID-style family (static/wrist RGB + depth images as jpeg
`Image`s, `cartesian_position [6]`, `gripper_position [1]`, `joint_position [7]`, an `action_dict`, `action [7]`).
"""

import numpy as np
import pytest

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.tf_setup import tf

T = 10
IMAGE = Feature(dtype="image")
FLAG = Feature(dtype="bool")
TDROID = {
    "observation": {"wrist_image": IMAGE, "wrist_depth_image": IMAGE, "static_image": IMAGE,
                    "static_depth_image": IMAGE, "cartesian_position": Feature((6,)),
                    "gripper_position": Feature((1,)), "joint_position": Feature((7,))},
    "action_dict": {"cartesian_position": Feature((6,)), "cartesian_velocity": Feature((6,)),
                    "gripper_position": Feature((1,)), "gripper_velocity": Feature((1,)),
                    "joint_position": Feature((7,)), "joint_velocity": Feature((7,))},
    "action": Feature((7,)),
    "discount": Feature(), "reward": Feature(), "is_first": FLAG, "is_last": FLAG, "is_terminal": FLAG,
    "language_instruction": Feature(dtype="string"),
    "traj_metadata": {"episode_metadata": {"file_path": Feature(dtype="string"),
                                           "recording_folderpath": Feature(dtype="string")}},
}
NAMES = ["tdroid_carrot_in_bowl", "tdroid_pour_corn_in_pot", "tdroid_flip_pot_upright",
         "tdroid_move_object_onto_plate", "tdroid_knock_object_over", "tdroid_cover_object_with_towel"]


def backward_binarize(a: np.ndarray) -> np.ndarray:
    """> 0.95 open, < 0.05 closed, in-between copies the next decided value (last raw value at the tail)."""
    out, carry = np.empty_like(a), a[-1]
    for i in range(len(a) - 1, -1, -1):
        if a[i] > 0.95 or a[i] < 0.05:
            carry = float(a[i] > 0.95)
        out[i] = carry
    return out


@pytest.mark.parametrize("name", NAMES)
def test_tdroid(name):
    traj = synthetic_trajectory(TDROID, T, instruction="put the carrot in the bowl")
    action = traj["action"].numpy().copy()
    gripper = np.array([1.0, 0.6, 0.02, 0.0, 0.5, 0.97, 1.0, 0.3, 0.0, 0.4], np.float32)
    action[:, 6] = gripper
    traj["action"] = tf.constant(action)
    raw = tf.nest.map_structure(lambda x: x.numpy(), traj)
    out = run_in_graph(get_standardize_transform(name), traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :6], action[:, :6])
    expected = backward_binarize(gripper)
    np.testing.assert_allclose(expected, [1, 0, 0, 0, 1, 1, 1, 0, 0, 0.4], rtol=1e-6)
    np.testing.assert_allclose(out["action"][:, 6], expected)
    np.testing.assert_allclose(out["observation"]["EEF_state"], raw["observation"]["cartesian_position"])
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["observation"]["gripper_position"])
    assert {"static_image", "static_depth_image"} <= set(out["observation"])
    assert out["language_instruction"].tolist() == [b"put the carrot in the bowl"] * T
