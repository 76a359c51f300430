"""UC San Diego xArm datasets (kitchen, pick-and-place)."""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.tf_setup import tf


def _copy(traj: Trajectory) -> Trajectory:
    """A shallow copy whose `observation` dict can be edited without touching the input."""
    return {**traj, "observation": dict(traj["observation"])}


@register("ucsd_kitchen_dataset_converted_externally_to_rlds")
def ucsd_kitchen(traj: Trajectory) -> Trajectory:
    """8-D action `[pose (6), gripper, terminate]` -> drop `terminate`; `joint_state` = first 7 of the 21-D state."""
    out = _copy(traj)
    out["observation"]["joint_state"] = traj["observation"]["state"][:, :7]
    out["action"] = traj["action"][:, :-1]
    return out


@register("ucsd_pick_and_place_dataset_converted_externally_to_rlds")
def ucsd_pick_and_place(traj: Trajectory) -> Trajectory:
    """4-D action `[xyz velocity, gripper torque]` -> `[xyz, zero rotation, gripper]` (gripper passed through)."""
    out = _copy(traj)
    state = traj["observation"]["state"]
    out["observation"]["eef_state"] = state[:, :6]
    out["observation"]["gripper_state"] = state[:, -1:]
    actions = traj["action"]
    out["action"] = tf.concat([actions[:, :3], tf.zeros_like(actions[:, :3]), actions[:, -1:]], axis=-1)
    return out
