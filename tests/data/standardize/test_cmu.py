"""Transforms of `vla_train/data/standardize/cmu.py`, on synthetic trajectories with each dataset's real features.

Feature structures come from the TFDS catalog pages (tensorflow/datasets `docs/catalog/<name>.md`) unless noted.
"""

import numpy as np

from tests.data.synthetic import (
    IMAGE,
    STEP_EXTRAS,
    TEXT,
    Feature,
    check_standardized,
    run_in_graph,
    synthetic_trajectory,
)
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.tf_setup import tf

T = 8


def rlds(observation: dict, action) -> dict:
    return {**STEP_EXTRAS, "observation": observation, "action": action,
            "traj_metadata": {"episode_metadata": {"file_path": TEXT}}}


def to_numpy(traj: dict) -> dict:
    return tf.nest.map_structure(lambda x: x.numpy(), traj)


def run(name: str, traj: dict) -> dict:
    return run_in_graph(get_standardize_transform(name), traj)


def quaternion_xyzw(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Unit quaternions of R = Rz(yaw) Ry(pitch) Rx(roll), in (x, y, z, w) order."""
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.stack([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy, cr * cp * cy + sr * sp * sy], axis=-1)


def with_rotations(traj: dict, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Put unit quaternions of known Euler angles into action columns 3:7; return the angles."""
    angles = np.random.default_rng(seed).uniform([-2.5, -1.2, -2.5], [2.5, 1.2, 2.5], size=(T, 3))
    action = traj["action"].numpy().copy()
    action[:, 3:7] = quaternion_xyzw(*angles.T)
    traj["action"] = tf.constant(action)
    return traj, angles


IAMLAB = rlds({"image": IMAGE, "state": Feature((20,)), "wrist_image": IMAGE}, Feature((8,)))


def test_iamlab_pick_insert():
    traj, angles = with_rotations(synthetic_trajectory(IAMLAB, T))
    raw, out = to_numpy(traj), run("iamlab_cmu_pickup_insert_converted_externally_to_rlds", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :3], raw["action"][:, :3])
    np.testing.assert_allclose(out["action"][:, 3:6], angles, atol=1e-4)
    np.testing.assert_allclose(out["action"][:, 6], raw["action"][:, 7])  # gripper kept as recorded
    np.testing.assert_allclose(out["observation"]["joint_state"], raw["observation"]["state"][:, :7])
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["observation"]["state"][:, 7:8])
    assert {"image", "wrist_image"} <= set(out["observation"])
    np.testing.assert_array_equal(out["language_instruction"], raw["language_instruction"])


# `cmu_playing_with_food` has no stored catalog page: keys and the 8-D action from the dataset's features.json
# inventory; the state width (6: POS_EULER with two padding slots in the reference config) is not used here.
FOOD = rlds({"finger_vision_1": IMAGE, "finger_vision_2": IMAGE, "image": IMAGE, "state": Feature((6,))},
            Feature((8,)))


def test_cmu_playing_with_food():
    traj, angles = with_rotations(synthetic_trajectory(FOOD, T), seed=1)
    raw, out = to_numpy(traj), run("cmu_playing_with_food", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :3], raw["action"][:, :3])
    np.testing.assert_allclose(out["action"][:, 3:6], angles, atol=1e-4)
    np.testing.assert_allclose(out["action"][:, 6], raw["action"][:, 7])
    np.testing.assert_allclose(out["observation"]["state"], raw["observation"]["state"])
    assert {"image", "finger_vision_1"} <= set(out["observation"])
    np.testing.assert_array_equal(out["language_instruction"], raw["language_instruction"])


PLAY_FUSION = rlds({"image": IMAGE, "state": Feature((8,))}, Feature((9,)))


def test_cmu_play_fusion_slices_first_three_and_last_four():
    # The catalog documents the action as [pos 3, quat 4, gripper, terminate]; the reference keeps columns
    # 0-2 and 5-8 (two quaternion components, gripper, terminate). Reproduced as-is.
    traj = synthetic_trajectory(PLAY_FUSION, T)
    raw, out = to_numpy(traj), run("cmu_play_fusion", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"], raw["action"][:, [0, 1, 2, 5, 6, 7, 8]])
    np.testing.assert_allclose(out["observation"]["state"], raw["observation"]["state"])
    np.testing.assert_array_equal(out["language_instruction"], raw["language_instruction"])


STRETCH = rlds({"image": IMAGE, "state": Feature((4,))}, Feature((8,)))


def test_cmu_stretch():
    traj = synthetic_trajectory(STRETCH, T)
    raw, out = to_numpy(traj), run("cmu_stretch", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"], raw["action"][:, :7])  # terminate flag dropped
    state = raw["observation"]["state"]
    np.testing.assert_allclose(out["observation"]["eef_state"],
                               np.concatenate([state[:, :3], np.zeros((T, 3), np.float32)], axis=1))
    np.testing.assert_allclose(out["observation"]["gripper_state"], state[:, 3:4])
    assert "image" in out["observation"]
    np.testing.assert_array_equal(out["language_instruction"], raw["language_instruction"])
