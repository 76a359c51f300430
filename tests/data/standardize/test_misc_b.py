"""Transforms of `misc_b` on synthetic trajectories with each dataset's real feature structure.

Structures come from the TFDS catalog pages (tensorflow/datasets `docs/catalog/<name>.md`) except where noted.
"""

import numpy as np
import pytest

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.tf_setup import tf

T = 10
INSTRUCTION = "assemble the lamp"
IMAGE = Feature(dtype="image")


def rlds_steps(action: Feature, observation: dict, **extra) -> dict:
    """The step features most OXE catalog pages share, plus the dataset's action, observation and extras."""
    return {"action": action, "discount": Feature(), "is_first": Feature(dtype="bool"),
            "is_last": Feature(dtype="bool"), "is_terminal": Feature(dtype="bool"),
            "language_embedding": Feature((512,)), "language_instruction": Feature(dtype="string"),
            "observation": observation, "reward": Feature(), **extra}


NYU_FRANKA_PLAY = rlds_steps(Feature((15,)), {
    "depth": Feature((128, 128, 1), "int32"), "depth_additional_view": Feature((128, 128, 1), "int32"),
    "image": IMAGE, "image_additional_view": IMAGE, "state": Feature((13,))})
MANISKILL = rlds_steps(Feature((7,)), {
    "base_pose": Feature((7,)), "depth": IMAGE, "image": IMAGE, "main_camera_cam2world_gl": Feature((4, 4)),
    "main_camera_extrinsic_cv": Feature((4, 4)), "main_camera_intrinsic_cv": Feature((3, 3)),
    "state": Feature((18,)), "target_object_or_part_final_pose": Feature((7,)),
    "target_object_or_part_final_pose_valid": Feature((7,), "uint8"),
    "target_object_or_part_initial_pose": Feature((7,)),
    "target_object_or_part_initial_pose_valid": Feature((7,), "uint8"), "tcp_pose": Feature((7,)),
    "wrist_camera_cam2world_gl": Feature((4, 4)), "wrist_camera_extrinsic_cv": Feature((4, 4)),
    "wrist_camera_intrinsic_cv": Feature((3, 3)), "wrist_depth": IMAGE, "wrist_image": IMAGE})
# No catalog page in the index: structure from the dataset's own RLDS builder (youngwoon/furniture_bench_rlds_dataset_
# builder). state = [eef xyz, eef quat, eef lin/ang velocity, joint pos / vel / torque (7 each), gripper width].
FURNITURE_BENCH = rlds_steps(Feature((8,)), {"image": IMAGE, "wrist_image": IMAGE, "state": Feature((35,))},
                             skill_completion=Feature())
CMU_FRANKA_EXPLORATION = rlds_steps(Feature((8,)), {"highres_image": IMAGE, "image": IMAGE},
                                    structured_action=Feature((8,)))
BC_Z = {  # no top-level language / discount / embedding: the instruction is an observation
    "action": {"future/axis_angle_residual": Feature((30,)), "future/target_close": Feature((10,), "int64"),
               "future/xyz_residual": Feature((30,))},
    "is_first": Feature(dtype="bool"), "is_last": Feature(dtype="bool"), "is_terminal": Feature(dtype="bool"),
    "observation": {"episode_success": Feature(), "image": IMAGE, "natural_language_embedding": Feature((512,)),
                    "natural_language_instruction": Feature(dtype="string"), "present/autonomous": Feature((), "int64"),
                    "present/axis_angle": Feature((3,)), "present/intervention": Feature((), "int64"),
                    "present/sensed_close": Feature((1,)), "present/xyz": Feature((3,)),
                    "sequence_length": Feature((), "int64")},
    "reward": Feature()}
# No catalog page in the index: structure derived from the reference transform and config (images `image`, `image1`;
# 5-D state and action = [xyz, yaw, gripper]) plus a third-party converter that reads the same fields.
ROBO_NET = rlds_steps(Feature((5,)), {"image": IMAGE, "image1": IMAGE, "image2": IMAGE, "state": Feature((5,))})
BERKELEY_MVP = rlds_steps(Feature((8,)), {"gripper": Feature((), "bool"), "hand_image": IMAGE,
                                          "joint_pos": Feature((7,)), "pose": Feature((7,))})
BERKELEY_RPT = rlds_steps(Feature((8,)), {"gripper": Feature((), "bool"), "hand_image": IMAGE,
                                          "joint_pos": Feature((7,))})
KAIST = rlds_steps(Feature((20,)), {"image": IMAGE, "partial_pointcloud": Feature((512, 3)), "state": Feature((21,))})
MASK_VIT = rlds_steps(Feature((5,)), {"end_effector_pose": Feature((5,)), "finger_sensors": Feature((1,)),
                                      "high_bound": Feature((5,)), "image": IMAGE, "low_bound": Feature((5,)),
                                      "state": Feature((15,))})
ASU_TABLE_TOP = rlds_steps(
    Feature((7,)), {"image": IMAGE, "state": Feature((7,)), "state_vel": Feature((7,))},
    action_delta=Feature((7,)), action_inst=Feature(dtype="string"), goal_object=Feature(dtype="string"),
    ground_truth_states={k: Feature((6,)) for k in ("EE", "bottle", "bread", "coke", "cube", "milk", "pepsi")})

GRIPPER = np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, -2.0, 0.75, 1.0], np.float32)


def run(name: str, structure: dict, action_dim: int = 7, gripper: np.ndarray | None = None) -> tuple[dict, dict]:
    """Synthetic trajectory (optionally with the given last action column) -> (numpy inputs, transform output)."""
    traj = synthetic_trajectory(structure, length=T, instruction=INSTRUCTION)
    if gripper is not None:
        action = traj["action"].numpy().copy()
        action[:, -1] = gripper
        traj["action"] = tf.constant(action)
    out = run_in_graph(get_standardize_transform(name), traj)
    check_standardized(out, T, action_dim=action_dim)
    assert set(out["language_instruction"].tolist()) == {INSTRUCTION.encode()}
    return tf.nest.map_structure(lambda t: t.numpy(), traj), out


def test_nyu_franka_play():
    raw, out = run("nyu_franka_play_dataset_converted_externally_to_rlds", NYU_FRANKA_PLAY)
    action = raw["action"]
    np.testing.assert_allclose(out["action"][:, :6], action[:, 7:13])  # EE delta xyz + rpy
    np.testing.assert_allclose(out["action"][:, 6], np.clip(action[:, 13], 0.0, 1.0))  # clipped, not inverted
    obs = out["observation"]
    np.testing.assert_allclose(obs["eef_state"], raw["observation"]["state"][:, 7:])
    for key in ("depth", "depth_additional_view"):
        assert obs[key].dtype == np.float32 and obs[key].shape == (T, 128, 128)
        np.testing.assert_array_equal(obs[key], raw["observation"][key][..., 0].astype(np.float32))
    assert {"image", "image_additional_view"} <= set(obs)


def test_maniskill():
    raw, out = run("maniskill_dataset_converted_externally_to_rlds", MANISKILL)
    np.testing.assert_allclose(out["action"], raw["action"])  # gripper kept as -1 close / +1 open (reference)
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["observation"]["state"][:, 7:8])
    np.testing.assert_allclose(out["observation"]["tcp_pose"], raw["observation"]["tcp_pose"])
    assert {"image", "wrist_image", "depth", "wrist_depth"} <= set(out["observation"])


def _quaternion_xyzw(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.stack([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy, cr * cp * cy + sr * sp * sy], axis=-1)


def test_furniture_bench():
    traj = synthetic_trajectory(FURNITURE_BENCH, length=T, instruction=INSTRUCTION)
    angles = np.random.default_rng(1).uniform([-2.5, -1.2, -2.5], [2.5, 1.2, 2.5], size=(T, 3)).astype(np.float32)
    action = traj["action"].numpy().copy()
    action[:, 3:7] = _quaternion_xyzw(*angles.T)
    action[:, 7] = GRIPPER
    traj["action"] = tf.constant(action)
    out = run_in_graph(get_standardize_transform("furniture_bench_dataset_converted_externally_to_rlds"), traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :3], action[:, :3])
    np.testing.assert_allclose(out["action"][:, 3:6], angles, atol=1e-4)  # quaternion -> roll, pitch, yaw
    np.testing.assert_allclose(out["action"][:, 6], 1.0 - np.clip(GRIPPER, 0.0, 1.0))  # +1 close -> 0
    state = traj["observation"]["state"].numpy()
    np.testing.assert_allclose(out["observation"]["state"], np.concatenate([state[:, :7], state[:, 34:]], axis=1))
    assert {"image", "wrist_image"} <= set(out["observation"])


def test_cmu_franka_exploration():
    raw, out = run("cmu_franka_exploration_dataset_converted_externally_to_rlds", CMU_FRANKA_EXPLORATION)
    np.testing.assert_allclose(out["action"], raw["action"][:, :7])  # terminate flag dropped
    assert "highres_image" in out["observation"]


def test_bc_z():
    traj = synthetic_trajectory(BC_Z, length=T, instruction=INSTRUCTION)
    close = np.zeros((T, 10), np.int64)
    close[:, 0] = [0, 1, 1, 0, 0, 1, 0, 1, 1, 0]
    close[:, 1:] = 1 - close[:, :1]  # later future steps must not leak in
    traj["action"]["future/target_close"] = tf.constant(close)
    out = run_in_graph(get_standardize_transform("bc_z"), traj)
    check_standardized(out, T)
    act = {k: v.numpy() for k, v in traj["action"].items()}
    np.testing.assert_allclose(out["action"][:, :3], act["future/xyz_residual"][:, :3])
    np.testing.assert_allclose(out["action"][:, 3:6], act["future/axis_angle_residual"][:, :3])
    np.testing.assert_allclose(out["action"][:, 6], 1.0 - close[:, 0])  # target_close 1 -> 0 (closed)
    assert set(out["language_instruction"].tolist()) == {INSTRUCTION.encode()}  # from the observation
    for key in ("present/xyz", "present/axis_angle", "present/sensed_close"):
        np.testing.assert_allclose(out["observation"][key], traj["observation"][key].numpy())


def _padded_yaw(values: np.ndarray) -> np.ndarray:
    return np.concatenate([values[:, :4], np.zeros((len(values), 2), np.float32), values[:, 4:]], axis=1)


def test_robo_net():
    raw, out = run("robo_net", ROBO_NET, gripper=GRIPPER)
    np.testing.assert_allclose(out["action"], _padded_yaw(raw["action"]))  # gripper passed through (reference)
    state = raw["observation"]["state"]
    np.testing.assert_allclose(out["observation"]["eef_state"], _padded_yaw(state)[:, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], state[:, 4:])
    assert {"image", "image1"} <= set(out["observation"])


@pytest.mark.parametrize("name, structure", [("berkeley_mvp_converted_externally_to_rlds", BERKELEY_MVP),
                                             ("berkeley_rpt_converted_externally_to_rlds", BERKELEY_RPT)])
def test_berkeley_mvp_rpt(name, structure):
    raw, out = run(name, structure, action_dim=8)  # JOINT_POS: 7 joint deltas + gripper, unchanged
    np.testing.assert_allclose(out["action"], raw["action"])
    gripper = out["observation"]["gripper"]
    assert gripper.dtype == np.float32 and gripper.shape == (T, 1)
    np.testing.assert_array_equal(gripper[:, 0], raw["observation"]["gripper"].astype(np.float32))
    np.testing.assert_allclose(out["observation"]["joint_pos"], raw["observation"]["joint_pos"])
    assert "hand_image" in out["observation"]


def test_kaist_nonprehensile():
    raw, out = run("kaist_nonprehensile_converted_externally_to_rlds", KAIST)
    np.testing.assert_allclose(out["action"][:, :6], raw["action"][:, :6])
    np.testing.assert_array_equal(out["action"][:, 6], 0.0)  # no gripper: constant 0, as the reference pads
    np.testing.assert_allclose(out["observation"]["state"], raw["observation"]["state"][:, 14:])  # xyz + quaternion


def test_stanford_mask_vit():
    raw, out = run("stanford_mask_vit_converted_externally_to_rlds", MASK_VIT, gripper=GRIPPER)
    np.testing.assert_allclose(out["action"], _padded_yaw(raw["action"]))  # gripper passed through (reference)
    pose = raw["observation"]["end_effector_pose"]
    np.testing.assert_allclose(out["observation"]["eef_state"], _padded_yaw(pose)[:, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], pose[:, 4:])


def test_asu_table_top():
    raw, out = run("asu_table_top_converted_externally_to_rlds", ASU_TABLE_TOP)
    np.testing.assert_allclose(out["action"], raw["action"])
    np.testing.assert_allclose(out["observation"]["eef_state"], raw["ground_truth_states"]["EE"])
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["observation"]["state"][:, 6:])
