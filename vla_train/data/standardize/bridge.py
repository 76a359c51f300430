"""Bridge V2 (the Open-X copy and the original release) and PPGM.

Bridge episodes start with an all-zero action, so their first step is dropped; their actions are then relabelled from
consecutive states (`relabel_bridge_actions`), which drops the last step as well: `T` steps in, `T - 2` out.
"""

from typing import Any

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import binarize_gripper_actions, relabel_bridge_actions
from vla_train.data.tf_setup import tf


def _float_concat(*parts: Any) -> tf.Tensor:
    return tf.concat([tf.cast(part, tf.float32) for part in parts], axis=-1)


def _drop_first_step(traj: Trajectory) -> Trajectory:
    """Every time-batched leaf without its first step (`traj_metadata` too, so all leaves keep one length)."""
    return tf.nest.map_structure(lambda x: x[1:], traj)


def _with_eef_and_gripper_state(traj: Trajectory, eef: tf.Tensor, gripper: tf.Tensor) -> Trajectory:
    """Adds `observation.EEF_state` (xyz + rpy, `[T, 6]`) and `observation.gripper_state` (`[T, 1]`)."""
    traj["observation"] = {**traj["observation"], "EEF_state": eef[:, :6], "gripper_state": gripper[:, -1:]}
    return traj


@register("bridge_oxe")
def bridge_oxe_transform(traj: Trajectory) -> Trajectory:
    """Bridge V2 as shipped in Open-X: RT-1-style action dict, instruction inside the observation."""
    traj = _drop_first_step(traj)
    action = traj["action"]
    traj["action"] = _float_concat(action["world_vector"], action["rotation_delta"], action["open_gripper"][:, None])
    traj["language_instruction"] = traj["observation"]["natural_language_instruction"]
    traj = relabel_bridge_actions(traj)
    state = traj["observation"]["state"]
    return _with_eef_and_gripper_state(traj, state, state)


@register("bridge_orig", "bridge_dataset")
def bridge_orig_transform(traj: Trajectory) -> Trajectory:
    """Bridge V2 from the project website: flat `[T, 7]` action whose continuous gripper command is binarized."""
    traj = _drop_first_step(traj)
    action = traj["action"]
    traj["action"] = _float_concat(action[:, :6], binarize_gripper_actions(action[:, -1])[:, None])
    traj = relabel_bridge_actions(traj)
    state = traj["observation"]["state"]
    return _with_eef_and_gripper_state(traj, state, state)


@register("ppgm", "ppgm_static", "ppgm_wrist")
def ppgm_transform(traj: Trajectory) -> Trajectory:
    """PPGM (DROID-style fields): binarized gripper command; state from `cartesian_position` / `gripper_position`."""
    traj = dict(traj)
    action = traj["action"]
    traj["action"] = _float_concat(action[:, :6], binarize_gripper_actions(action[:, -1])[:, None])
    observation = traj["observation"]
    return _with_eef_and_gripper_state(traj, observation["cartesian_position"], observation["gripper_position"])
