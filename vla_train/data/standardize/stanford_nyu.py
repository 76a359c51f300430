"""Externally converted Open-X datasets with a flat action tensor: Stanford Kuka multimodal, NYU ROT, Stanford HYDRA.

Their instruction is already the top-level `language_instruction`.
"""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import invert_gripper_actions
from vla_train.data.tf_setup import tf


def _copy(traj: Trajectory) -> Trajectory:
    return {**traj, "observation": dict(traj["observation"])}


@register("stanford_kuka_multimodal_dataset_converted_externally_to_rlds")
def stanford_kuka_multimodal_transform(traj: Trajectory) -> Trajectory:
    """`[T, 4]` action (xyz, gripper) -> `[xyz, 0, 0, 0, gripper]`; depth `[T, H, W, 1]` -> `[T, H, W]`."""
    out = _copy(traj)
    action = tf.cast(traj["action"], tf.float32)
    out["action"] = tf.concat([action[:, :3], tf.zeros_like(action[:, :3]), action[:, -1:]], axis=-1)
    out["observation"]["depth_image"] = traj["observation"]["depth_image"][..., 0]
    return out


@register("nyu_rot_dataset_converted_externally_to_rlds")
def nyu_rot_transform(traj: Trajectory) -> Trajectory:
    """Action used as stored (first 7 dims); `eef_state = state[:, :6]`, `gripper_state = state[:, -1:]`."""
    out = _copy(traj)
    state = traj["observation"]["state"]
    out["observation"]["eef_state"] = state[..., :6]
    out["observation"]["gripper_state"] = state[..., -1:]
    out["action"] = tf.cast(traj["action"][..., :7], tf.float32)
    return out


@register("stanford_hydra_dataset_converted_externally_to_rlds")
def stanford_hydra_transform(traj: Trajectory) -> Trajectory:
    """Gripper command inverted (1 = closed -> 1 = open); EEF state = position + Euler angles out of the 27-D state."""
    out = _copy(traj)
    action = tf.cast(traj["action"], tf.float32)
    out["action"] = tf.concat([action[:, :6], invert_gripper_actions(action[:, -1:])], axis=-1)
    state = traj["observation"]["state"]
    out["observation"]["eef_state"] = tf.concat([state[:, :3], state[:, 7:10]], axis=-1)
    out["observation"]["gripper_state"] = state[:, -3:-2]
    return out
