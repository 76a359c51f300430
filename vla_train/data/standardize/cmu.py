"""Carnegie Mellon datasets of the Open X-Embodiment collection: IAM Lab pick/insert, Playing with Food, PlayFusion
and Hello Stretch."""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import euler_from_quaternion
from vla_train.data.tf_setup import tf


def _copy(traj: Trajectory) -> Trajectory:
    return {**traj, "observation": dict(traj["observation"])}


def _position_quaternion_gripper(action: tf.Tensor, gripper_column: int) -> tf.Tensor:
    """`[xyz (3), quaternion xyzw (4), ...]` -> `[xyz, roll/pitch/yaw, action[:, gripper_column]]`."""
    action = tf.cast(action, tf.float32)
    gripper = action[:, gripper_column:][:, :1]
    return tf.concat([action[:, :3], euler_from_quaternion(action[:, 3:7]), gripper], axis=-1)


@register("iamlab_cmu_pickup_insert_converted_externally_to_rlds")
def iamlab_pick_insert_transform(traj: Trajectory) -> Trajectory:
    """Action `[pos 3, quat 4, gripper 1]` -> Euler rotation. State `[joints 7, gripper 1, torques, forces]` ->
    `joint_state` and `gripper_state`."""
    traj = _copy(traj)
    obs = traj["observation"]
    obs["joint_state"] = obs["state"][:, :7]
    obs["gripper_state"] = obs["state"][:, 7:8]
    traj["action"] = _position_quaternion_gripper(traj["action"], gripper_column=7)
    return traj


@register("cmu_playing_with_food")
def cmu_playing_with_food_transform(traj: Trajectory) -> Trajectory:
    """Action `[pos 3, quat 4, gripper 1]` -> Euler rotation; observations unchanged."""
    traj = _copy(traj)
    traj["action"] = _position_quaternion_gripper(traj["action"], gripper_column=-1)
    return traj


@register("cmu_play_fusion")
def cmu_play_fusion_transform(traj: Trajectory) -> Trajectory:
    """Action = raw columns 0-2 and the last 4 (5-8) of the 9-D action.

    The dataset documents its action as `[pos 3, quat 4, gripper, terminate]`, so this keeps two quaternion
    components and the terminate flag, with no Euler conversion. Reproduced as the reference slices it (its
    normalization statistics and trained checkpoints depend on it)."""
    traj = _copy(traj)
    action = tf.cast(traj["action"], tf.float32)
    traj["action"] = tf.concat([action[:, :3], action[:, -4:]], axis=-1)
    return traj


@register("cmu_stretch")
def cmu_stretch_transform(traj: Trajectory) -> Trajectory:
    """Drop the terminate flag from the action; `eef_state` = `[state[:, :3], 0, 0, 0]`, `gripper_state` = last
    state dim."""
    traj = _copy(traj)
    obs = traj["observation"]
    position = obs["state"][:, :3]
    obs["eef_state"] = tf.concat([position, tf.zeros_like(position)], axis=-1)
    obs["gripper_state"] = obs["state"][:, -1:]
    traj["action"] = tf.cast(traj["action"][..., :-1], tf.float32)
    return traj
