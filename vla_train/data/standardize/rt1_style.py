"""Open-X datasets whose action is an RT-1-style dict (`world_vector`, `rotation_delta`, a gripper field).

The instruction lives in `observation.natural_language_instruction`. Gripper conventions differ per dataset:
- relative commands (-1 open, +1 close, 0 keep) -> `rel2abs_gripper_actions`;
- absolute closedness (1 = closed) -> clipped to [0, 1] and inverted;
- absolute openness (`open_gripper`, 1 = open) -> used as is.
"""

from typing import Any

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import invert_gripper_actions, rel2abs_gripper_actions
from vla_train.data.tf_setup import tf


def _float_concat(*parts: Any) -> tf.Tensor:
    return tf.concat([tf.cast(part, tf.float32) for part in parts], axis=-1)


def _standardize(traj: Trajectory, gripper: tf.Tensor, rotation: tf.Tensor | None = None) -> Trajectory:
    """`action = [world_vector, rotation (default rotation_delta), gripper [T, 1]]`; language from the observation."""
    action = traj["action"]
    rotation = action["rotation_delta"] if rotation is None else rotation
    out = {**traj, "observation": dict(traj["observation"])}
    out["action"] = _float_concat(action["world_vector"], rotation, gripper)
    out["language_instruction"] = traj["observation"]["natural_language_instruction"]
    return out


def _relative_gripper(traj: Trajectory) -> tf.Tensor:
    """Relative gripper command (`[T]` or `[T, 1]`) -> absolute `[T, 1]`, 1 = open."""
    command = tf.reshape(traj["action"]["gripper_closedness_action"], [-1])
    return rel2abs_gripper_actions(command)[:, None]


def _inverted_closedness(traj: Trajectory) -> tf.Tensor:
    """Absolute closedness (`[T]` or `[T, 1]`, 1 = closed) -> clipped, inverted `[T, 1]`, 1 = open."""
    closedness = tf.reshape(tf.cast(traj["action"]["gripper_closedness_action"], tf.float32), [-1, 1])
    return invert_gripper_actions(tf.clip_by_value(closedness, 0.0, 1.0))


def _decode_zlib_floats(value: tf.Tensor, width: int) -> tf.Tensor:
    """`[T]` zlib-compressed float32 byte strings -> `[T, width]`; an already-decoded tensor is only cast."""
    if value.dtype != tf.string:
        return tf.reshape(tf.cast(value, tf.float32), [-1, width])
    raw = tf.io.decode_raw(tf.io.decode_compressed(value, compression_type="ZLIB"), tf.float32)
    return tf.reshape(raw, [-1, width])


@register("fractal20220817_data")
def fractal_transform(traj: Trajectory) -> Trajectory:
    """RT-1 (fractal): relative gripper command; state keys (`base_pose_tool_reached`, ...) are used as stored."""
    return _standardize(traj, _relative_gripper(traj))


@register("kuka")
def kuka_transform(traj: Trajectory) -> Trajectory:
    """QT-Opt (kuka): relative gripper command; the pose and gripper state are stored zlib-compressed."""
    out = _standardize(traj, _relative_gripper(traj))
    pose_key = "clip_function_input/base_pose_tool_reached"
    out["observation"][pose_key] = _decode_zlib_floats(traj["observation"][pose_key], 7)
    out["observation"]["gripper_closed"] = _decode_zlib_floats(traj["observation"]["gripper_closed"], 1)
    return out


@register("taco_play")
def taco_play_transform(traj: Trajectory) -> Trajectory:
    """TACO play: base-frame relative action with the gripper clipped to [0, 1]; state from `robot_obs`."""
    robot_obs = traj["observation"]["robot_obs"]
    rel_action = traj["action"]["rel_actions_world"]
    out = {**traj, "observation": dict(traj["observation"])}
    out["observation"]["state_eef"] = robot_obs[:, :6]
    out["observation"]["state_gripper"] = robot_obs[:, 7:8]
    out["action"] = _float_concat(rel_action[:, :6], tf.clip_by_value(rel_action[:, -1:], 0.0, 1.0))
    out["language_instruction"] = traj["observation"]["natural_language_instruction"]
    return out


@register("jaco_play")
def jaco_play_transform(traj: Trajectory) -> Trajectory:
    """Jaco play: translation only (rotation zeroed), relative gripper command; state from the EEF pose."""
    world_vector = traj["action"]["world_vector"]
    out = _standardize(traj, _relative_gripper(traj), rotation=tf.zeros_like(world_vector))
    pose = traj["observation"]["end_effector_cartesian_pos"]
    out["observation"]["state_eef"] = pose[:, :6]
    out["observation"]["state_gripper"] = pose[:, -1:]
    return out


@register("berkeley_cable_routing")
def berkeley_cable_routing_transform(traj: Trajectory) -> Trajectory:
    """Cable routing: no gripper field; the gripper dimension is a constant 0."""
    return _standardize(traj, tf.zeros_like(traj["action"]["world_vector"][:, :1]))


@register("roboturk")
def roboturk_transform(traj: Trajectory) -> Trajectory:
    """RoboTurk: absolute closedness, clipped and inverted."""
    return _standardize(traj, _inverted_closedness(traj))


@register("nyu_door_opening_surprising_effectiveness")
def nyu_door_opening_transform(traj: Trajectory) -> Trajectory:
    """NYU door opening: relative gripper command."""
    return _standardize(traj, _relative_gripper(traj))


@register("viola")
def viola_transform(traj: Trajectory) -> Trajectory:
    """VIOLA: absolute closedness (a scalar per step), clipped and inverted."""
    return _standardize(traj, _inverted_closedness(traj))


@register("berkeley_autolab_ur5")
def berkeley_autolab_ur5_transform(traj: Trajectory) -> Trajectory:
    """Berkeley UR5: relative gripper command; `state = robot_state[:, 6:14]`; `image_with_depth` -> `depth`."""
    out = _standardize(traj, _relative_gripper(traj))
    out["observation"]["state"] = traj["observation"]["robot_state"][:, 6:14]
    out["observation"]["depth"] = out["observation"].pop("image_with_depth")
    return out


@register("toto")
def toto_transform(traj: Trajectory) -> Trajectory:
    """TOTO: boolean `open_gripper` (1 = open) used as is."""
    return _standardize(traj, traj["action"]["open_gripper"][:, None])


@register("columbia_cairlab_pusht_real")
def pusht_transform(traj: Trajectory) -> Trajectory:
    """Push-T (real): the raw `gripper_closedness_action` is passed through unchanged (as the reference does)."""
    return _standardize(traj, traj["action"]["gripper_closedness_action"][:, None])
