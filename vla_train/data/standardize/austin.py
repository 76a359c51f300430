"""UT Austin Franka datasets (BUDS, SAILOR, SIRIUS).

Their 7-D actions are `[xyz delta, rotation delta, gripper]` with the gripper commanded as -1 = open, +1 = close:
clipping to [0, 1] and inverting gives the standard 1 = open, 0 = closed.
"""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import invert_gripper_actions
from vla_train.data.tf_setup import tf


def _copy(traj: Trajectory) -> Trajectory:
    """A shallow copy whose `observation` dict can be edited without touching the input."""
    return {**traj, "observation": dict(traj["observation"])}


def _clip_invert_gripper(actions: tf.Tensor) -> tf.Tensor:
    """`[T, 7]` with a +1 = close gripper -> the same movement with gripper 1 = open, 0 = closed."""
    gripper = invert_gripper_actions(tf.clip_by_value(actions[:, -1:], 0.0, 1.0))
    return tf.concat([actions[:, :6], gripper], axis=-1)


@register("austin_buds_dataset_converted_externally_to_rlds")
def austin_buds(traj: Trajectory) -> Trajectory:
    """Gripper clipped and inverted; `state` (24-D) cut to its first 8: joint angles (7) and gripper (1)."""
    out = _copy(traj)
    out["action"] = _clip_invert_gripper(traj["action"])
    out["observation"]["state"] = traj["observation"]["state"][:, :8]
    return out


@register("austin_sailor_dataset_converted_externally_to_rlds", "austin_sirius_dataset_converted_externally_to_rlds")
def austin_sailor_sirius(traj: Trajectory) -> Trajectory:
    """Gripper clipped and inverted; observations unchanged (the configs read the 8-D `state`)."""
    out = _copy(traj)
    out["action"] = _clip_invert_gripper(traj["action"])
    return out
