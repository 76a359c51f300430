"""DROID transforms and DROID's zero-action frame filter (`vla_train/data/standardize/droid.py`).

DROID's catalog page (docs/catalog/droid.md) is not in the stored index; the structure below is DROID 1.0.1's TFDS
`features.json` (float64 robot state and `action_dict`, 180x320 jpeg cameras, three instruction strings).
`droid_wipe` is DROID-format fine-tuning data and shares it.
"""

import numpy as np
import pytest

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import get_frame_filter, get_standardize_transform
from vla_train.data.standardize.droid import DROID_ACTION_Q01, DROID_ACTION_Q99
from vla_train.data.tf_setup import tf

T = 8
IMAGE = Feature(dtype="image")
TEXT = Feature(dtype="string")
FLAG = Feature(dtype="bool")
F64 = "float64"
DROID = {
    "observation": {"exterior_image_1_left": IMAGE, "exterior_image_2_left": IMAGE, "wrist_image_left": IMAGE,
                    "cartesian_position": Feature((6,), F64), "gripper_position": Feature((1,), F64),
                    "joint_position": Feature((7,), F64)},
    "action_dict": {"cartesian_position": Feature((6,), F64), "cartesian_velocity": Feature((6,), F64),
                    "gripper_position": Feature((1,), F64), "gripper_velocity": Feature((1,), F64),
                    "joint_position": Feature((7,), F64), "joint_velocity": Feature((7,), F64)},
    "action": Feature((7,), F64),
    "discount": Feature(), "reward": Feature(), "is_first": FLAG, "is_last": FLAG, "is_terminal": FLAG,
    "language_instruction": TEXT, "language_instruction_2": TEXT, "language_instruction_3": TEXT,
    "traj_metadata": {"episode_metadata": {"file_path": TEXT, "recording_folderpath": TEXT}},
}


def droid_trajectory(seed: int = 0) -> dict:
    """A DROID trajectory whose camera frames are distinct byte strings (so swaps are visible)."""
    traj = synthetic_trajectory(DROID, T, seed=seed, instruction="wipe the table")
    for key in ("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left"):
        traj["observation"][key] = tf.constant([f"{key}/episode{seed}/step{t}".encode() for t in range(T)])
    return traj


def to_numpy(traj: dict) -> dict:
    return tf.nest.map_structure(lambda x: x.numpy(), traj)


def exteriors(out: dict) -> tuple[list[bytes], list[bytes]]:
    return (out["observation"]["exterior_image_1_left"].tolist(), out["observation"]["exterior_image_2_left"].tolist())


def check_droid_action(out: dict, raw: dict) -> None:
    check_standardized(out, T)
    velocity = raw["action_dict"]["cartesian_velocity"]
    expected = np.concatenate([velocity, 1.0 - raw["action_dict"]["gripper_position"]], axis=1)
    np.testing.assert_allclose(out["action"], expected.astype(np.float32), rtol=1e-6)
    obs = raw["observation"]
    np.testing.assert_allclose(out["observation"]["proprio"],
                               np.concatenate([obs["cartesian_position"], obs["gripper_position"]], axis=1))
    np.testing.assert_array_equal(out["observation"]["wrist_image_left"], obs["wrist_image_left"])
    np.testing.assert_array_equal(out["language_instruction"], raw["language_instruction"])
    assert out["language_instruction"][0] == b"wipe the table"


def test_droid_action_proprio_and_language():
    traj = droid_trajectory()
    raw, out = to_numpy(traj), run_in_graph(get_standardize_transform("droid"), traj)
    check_droid_action(out, raw)
    first, second = (raw["observation"][k].tolist() for k in ("exterior_image_1_left", "exterior_image_2_left"))
    assert exteriors(out) in [(first, second), (second, first)]  # one decision for the whole trajectory


def test_droid_swap_is_deterministic_and_fair():
    trajectories = [droid_trajectory(seed) for seed in range(64)]
    episodes = tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda *x: tf.stack(x), *trajectories))
    standardized = episodes.map(get_standardize_transform("droid"), num_parallel_calls=4, deterministic=True)
    first_pass = [exteriors(out) for out in standardized.as_numpy_iterator()]
    second_pass = [exteriors(out) for out in standardized.as_numpy_iterator()]
    assert first_pass == second_pass  # same trajectory, same choice, whatever the parallel scheduling
    swapped = []
    for traj, result in zip(trajectories, first_pass, strict=True):
        original = exteriors(to_numpy(traj))
        assert result in [original, original[::-1]]
        swapped.append(result != original)
    assert 16 <= sum(swapped) <= 48, sum(swapped)  # about half of the episodes are swapped


def test_droid_wipe_keeps_camera_order():
    traj = droid_trajectory(3)
    raw, out = to_numpy(traj), run_in_graph(get_standardize_transform("droid_wipe"), traj)
    check_droid_action(out, raw)
    assert exteriors(out) == exteriors(raw)


def bounds_q99(action: np.ndarray) -> np.ndarray:
    """The pipeline's BOUNDS_Q99 normalization with the DROID constants (mask: all but the gripper), float32."""
    q01, q99 = np.array(DROID_ACTION_Q01, np.float32), np.array(DROID_ACTION_Q99, np.float32)
    action = np.asarray(action, np.float32).copy()
    action[..., :6] = np.clip(2 * (action[..., :6] - q01) / (q99 - q01 + np.float32(1e-8)) - 1, -1, 1)
    return action


ZERO = bounds_q99(np.array([0, 0, 0, 0, 0, 0, 1], np.float32))


def keep(action: np.ndarray) -> bool:
    frame = {"action": tf.constant(action, tf.float32), "observation": {"timestep": tf.constant([0])}}
    return bool(get_frame_filter("droid_zero_action")(frame).numpy())


def test_normalized_zero_value():
    expected = 2 * (0 - np.array(DROID_ACTION_Q01)) / (np.array(DROID_ACTION_Q99) - np.array(DROID_ACTION_Q01)) - 1
    np.testing.assert_allclose(ZERO[:6], expected, atol=1e-6)
    assert np.all(np.abs(ZERO[:6]) < 0.2)  # near the middle of [-1, 1]: DROID's bounds are roughly symmetric


@pytest.mark.parametrize("shape", [(7,), (1, 7), (3, 7)])
def test_zero_action_frames_are_dropped(shape):
    zero = np.broadcast_to(ZERO, shape)
    assert not keep(zero)
    gripper_only = zero.copy()
    gripper_only[..., 6] = 0.0  # a gripper change alone is still a "zero action"
    assert not keep(gripper_only)
    within_tolerance = zero + np.float32(5e-6)
    assert not keep(within_tolerance)


@pytest.mark.parametrize("shape", [(7,), (1, 7), (3, 7)])
@pytest.mark.parametrize("dim", range(6))
def test_moving_frames_are_kept(shape, dim):
    moving = np.broadcast_to(ZERO, shape).copy()
    moving.reshape(-1, 7)[-1, dim] += 1e-3  # only one dimension of the last row of the chunk moves
    assert keep(moving)
    moving.reshape(-1, 7)[-1, dim] -= 2e-3
    assert keep(moving)


def test_filter_on_standardized_and_normalized_droid_frames():
    """Raw DROID step -> `droid` transform -> BOUNDS_Q99 -> filter, inside a tf.data graph."""
    traj = droid_trajectory(5)
    velocity = traj["action_dict"]["cartesian_velocity"].numpy().copy()
    velocity[::2] = 0.0  # even steps do not move
    traj["action_dict"]["cartesian_velocity"] = tf.constant(velocity)
    actions = run_in_graph(get_standardize_transform("droid"), traj)["action"]
    frames = tf.data.Dataset.from_tensor_slices({"action": bounds_q99(actions)[:, None, :],  # [T, window 1, 7]
                                                 "timestep": np.arange(T)})
    kept = [int(f["timestep"]) for f in frames.filter(get_frame_filter("droid_zero_action")).as_numpy_iterator()]
    assert kept == [1, 3, 5, 7]
