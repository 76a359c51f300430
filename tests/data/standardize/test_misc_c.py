"""Transforms of `vla_train/data/standardize/misc_c.py`, on synthetic trajectories with each dataset's real features.

Feature structures come from the TFDS catalog pages (tensorflow/datasets `docs/catalog/<name>.md`) unless noted.
"""

import numpy as np
import pytest

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


def rlds(observation: dict, action, metadata: dict | None = None, extras: dict | None = None) -> dict:
    """Step features plus `traj_metadata` (the episode metadata, broadcast over time as the RLDS reader does)."""
    steps = {**STEP_EXTRAS, **(extras or {}), "observation": observation, "action": action}
    return {**steps, "traj_metadata": {"episode_metadata": metadata or {"file_path": TEXT}}}


def to_numpy(traj: dict) -> dict:
    return tf.nest.map_structure(lambda x: x.numpy(), traj)


def with_column(traj: dict, path: tuple[str, ...], column: int, values) -> dict:
    """Overwrite `traj[path][:, column]` with `values` (to exercise specific gripper values)."""
    node = traj
    for key in path[:-1]:
        node = node[key]
    array = node[path[-1]].numpy().copy()
    array[:, column] = np.asarray(values, dtype=array.dtype)
    node[path[-1]] = tf.constant(array)
    return traj


def run(name: str, traj: dict) -> dict:
    return run_in_graph(get_standardize_transform(name), traj)


def assert_language_passthrough(out: dict, raw: dict) -> None:
    np.testing.assert_array_equal(out["language_instruction"], raw["language_instruction"])
    assert out["language_instruction"][0] == b"pick up the red block"


ROBOCOOK = rlds(
    {**{f"depth_{i}": Feature((256, 256)) for i in range(1, 5)}, **{f"image_{i}": IMAGE for i in range(1, 5)},
     "state": Feature((7,))},
    Feature((7,)),
    {**{f"extrinsics_{i}": Feature((4, 4)) for i in range(1, 5)}, "file_path": TEXT})


def test_robocook():
    traj = synthetic_trajectory(ROBOCOOK, T)
    raw, out = to_numpy(traj), run("stanford_robocook_converted_externally_to_rlds", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"], raw["action"])
    np.testing.assert_allclose(out["observation"]["eef_state"], raw["observation"]["state"][:, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["observation"]["state"][:, 6:])
    assert {"image_1", "image_2", "depth_1", "depth_2"} <= set(out["observation"])
    np.testing.assert_array_equal(out["traj_metadata"]["episode_metadata"]["file_path"],
                                  raw["traj_metadata"]["episode_metadata"]["file_path"])
    assert_language_passthrough(out, raw)


IMPERIAL = rlds({"image": IMAGE, "state": Feature((1,)), "wrist_image": IMAGE}, Feature((8,)))


def test_imperial_wrist_cam_drops_terminate():
    traj = synthetic_trajectory(IMPERIAL, T)
    raw, out = to_numpy(traj), run("imperialcollege_sawyer_wrist_cam", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"], raw["action"][:, :7])
    assert {"image", "wrist_image", "state"} <= set(out["observation"])
    assert_language_passthrough(out, raw)


D3FIELD = rlds(
    {**{f"depth_{i}": IMAGE for i in range(1, 5)}, **{f"image_{i}": IMAGE for i in range(1, 5)},
     "state": Feature((4, 4))},
    Feature((3,)))


def test_uiuc_d3field_pads_displacement():
    traj = synthetic_trajectory(D3FIELD, T)
    raw, out = to_numpy(traj), run("uiuc_d3field", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :3], raw["action"])
    np.testing.assert_array_equal(out["action"][:, 3:], np.zeros((T, 4), np.float32))  # no rotation, gripper 0
    assert {"image_1", "image_2", "depth_1", "depth_2"} <= set(out["observation"])
    assert_language_passthrough(out, raw)


MUTEX = rlds({"image": IMAGE, "state": Feature((24,)), "wrist_image": IMAGE}, Feature((7,)))


def test_utaustin_mutex_clips_and_inverts_gripper():
    gripper = [-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 0.9]
    traj = with_column(synthetic_trajectory(MUTEX, T), ("action",), 6, gripper)
    raw, out = to_numpy(traj), run("utaustin_mutex", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :6], raw["action"][:, :6])
    np.testing.assert_allclose(out["action"][:, 6], [1.0, 1.0, 1.0, 0.75, 0.5, 0.0, 0.0, 0.1], atol=1e-6)
    assert out["observation"]["state"].shape == (T, 8)
    np.testing.assert_allclose(out["observation"]["state"], raw["observation"]["state"][:, :8])
    assert_language_passthrough(out, raw)


FANUC = rlds({"end_effector_state": Feature((7,)), "image": IMAGE, "state": Feature((13,)), "wrist_image": IMAGE},
             Feature((6,)))


def test_berkeley_fanuc_gripper_from_state():
    traj = with_column(synthetic_trajectory(FANUC, T), ("observation", "state"), 6, [0, 1, 1, 0, 1, 0, 0, 1])
    raw, out = to_numpy(traj), run("berkeley_fanuc_manipulation", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :6], raw["action"])
    np.testing.assert_allclose(out["action"][:, 6], [1, 0, 0, 1, 0, 1, 1, 0])  # 1 - gripper open status
    np.testing.assert_allclose(out["observation"]["joint_state"], raw["observation"]["state"][:, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["observation"]["state"][:, 6:7])
    assert_language_passthrough(out, raw)


# The three GNM navigation sets share one structure (float64 actions and state).
GNM = rlds({"image": IMAGE, "position": Feature((2,), "float64"), "state": Feature((3,), "float64"),
            "yaw": Feature((1,), "float64")},
           Feature((2,), "float64"),
           extras={"action_angle": Feature((3,), "float64"), "discount": Feature((), "float64"),
                   "reward": Feature((), "float64")})


@pytest.mark.parametrize("name", ["berkeley_gnm_recon", "berkeley_gnm_cory_hall", "berkeley_gnm_sac_son"])
def test_gnm(name):
    traj = synthetic_trajectory(GNM, T)
    raw, out = to_numpy(traj), run(name, traj)
    check_standardized(out, T)
    expected = np.concatenate([raw["action"], np.zeros((T, 5))], axis=1).astype(np.float32)
    np.testing.assert_allclose(out["action"], expected)
    obs = raw["observation"]
    np.testing.assert_allclose(out["observation"]["state"],
                               np.concatenate([obs["position"], np.zeros((T, 3)), obs["yaw"]], axis=1))
    assert "image" in out["observation"]
    assert_language_passthrough(out, raw)


# OpenVLA's `fmb_dataset` is the FMB release; structure from the TFDS catalog page `fmb`.
FMB = rlds(
    {"color_id": Feature((), "uint8"), "eef_force": Feature((3,)), "eef_pose": Feature((7,)),
     "eef_torque": Feature((3,)), "eef_vel": Feature((6,)),
     **{f"image_{view}": IMAGE for view in ("side_1", "side_2", "wrist_1", "wrist_2")},
     **{f"image_{view}_depth": Feature((256, 256)) for view in ("side_1", "side_2", "wrist_1", "wrist_2")},
     "joint_pos": Feature((7,)), "joint_vel": Feature((7,)), "length": TEXT, "object_id": Feature((), "uint8"),
     "primitive": TEXT, "shape_id": Feature((), "uint8"), "size": TEXT, "state_gripper_pose": Feature()},
    Feature((7,)),
    {"episode_language_embedding": Feature((512,)), "episode_language_instruction": TEXT, "episode_task": TEXT,
     "file_path": TEXT})


def test_fmb_proprio():
    traj = synthetic_trajectory(FMB, T)
    raw, out = to_numpy(traj), run("fmb_dataset", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"], raw["action"])
    obs = raw["observation"]
    np.testing.assert_allclose(out["observation"]["proprio"],
                               np.concatenate([obs["eef_pose"], obs["state_gripper_pose"][:, None]], axis=1))
    assert out["observation"]["proprio"].shape == (T, 8)
    assert {"image_side_1", "image_side_2", "image_wrist_1", "image_side_1_depth"} <= set(out["observation"])
    assert_language_passthrough(out, raw)


DOBBE = rlds({"gripper": Feature((1,)), "quat": Feature((4,)), "rot": Feature((3,)), "state": Feature((7,)),
              "wrist_image": IMAGE, "xyz": Feature((3,))},
             Feature((7,)))


def test_dobbe_proprio_is_state():
    traj = synthetic_trajectory(DOBBE, T)
    raw, out = to_numpy(traj), run("dobbe", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"], raw["action"])
    np.testing.assert_allclose(out["observation"]["proprio"], raw["observation"]["state"])
    assert "wrist_image" in out["observation"]
    assert_language_passthrough(out, raw)


# OpenVLA's `roboset` is the RoboSet release; structure from the TFDS catalog page `robo_set`.
ROBOSET = rlds({"image_left": IMAGE, "image_right": IMAGE, "image_top": IMAGE, "image_wrist": IMAGE,
                "state": Feature((8,)), "state_velocity": Feature((8,))},
               Feature((8,)),
               {"file_path": TEXT, "trial_id": TEXT})


def test_roboset_joint_action():
    gripper = [-1.0, 0.0, 0.2, 1.0, 0.7, -0.3, 1.0, 0.0]
    traj = with_column(synthetic_trajectory(ROBOSET, T), ("action",), 7, gripper)
    raw, out = to_numpy(traj), run("roboset", traj)
    check_standardized(out, T, action_dim=8)  # JOINT_POS: 7 joints + gripper
    np.testing.assert_allclose(out["action"][:, :7], raw["action"][:, :7])
    np.testing.assert_allclose(out["action"][:, 7], [1.0, 1.0, 0.8, 0.0, 0.3, 1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(out["observation"]["proprio"], raw["observation"]["state"])
    assert {"image_left", "image_right", "image_wrist"} <= set(out["observation"])
    assert_language_passthrough(out, raw)


# No TFDS catalog page for RH20T: observation/action keys from the RH20T RLDS builder (tcp_base, gripper_width,
# dict action with tcp_base + int64 gripper) and camera names from the reference config (OpenVLA's RH20T conversion
# keeps several cameras per episode).
RH20T = rlds(
    {"image_front": IMAGE, "image_side_left": IMAGE, "image_side_right": IMAGE, "image_wrist": IMAGE,
     "tcp": Feature((6,)), "tcp_base": Feature((6,)), "joint": Feature((7,)), "joint_vel": Feature((7,)),
     "ft_robot_base": Feature((6,)), "ft_zeroed_base": Feature((6,)), "gripper_width": Feature(),
     "timestamp": Feature((), "int64")},
    {"tcp": Feature((6,)), "tcp_base": Feature((6,)), "gripper": Feature((), "int64")},
    {"file_path": TEXT, "task_id": Feature((), "int64")})


def test_rh20t():
    traj = synthetic_trajectory(RH20T, T)
    raw, out = to_numpy(traj), run("rh20t", traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :6], raw["action"]["tcp_base"])
    np.testing.assert_allclose(out["action"][:, 6], raw["action"]["gripper"].astype(np.float32))
    obs = raw["observation"]
    np.testing.assert_allclose(out["observation"]["proprio"],
                               np.concatenate([obs["tcp_base"], obs["gripper_width"][:, None]], axis=1))
    assert {"image_front", "image_side_right", "image_wrist"} <= set(out["observation"])
    assert_language_passthrough(out, raw)
