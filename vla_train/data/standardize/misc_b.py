"""Assorted single-dataset families: NYU Franka play, ManiSkill, FurnitureBench, CMU Franka exploration, BC-Z,
RoboNet, Berkeley MVP / RPT, KAIST non-prehensile, Stanford MaskViT and ASU table-top.

Gripper values follow the reference: where it passes a dataset's own convention through (ManiSkill: -1 closed / +1
open; MaskViT, and RoboNet by its converters: -1 open / +1 close), so does this module. RoboNet and MaskViT keep their
yaw in action / EEF-state dim 3 (the roll slot), as the reference does.
"""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import euler_from_quaternion, invert_gripper_actions
from vla_train.data.tf_setup import tf


def _copy(traj: Trajectory) -> Trajectory:
    """A shallow copy whose `observation` dict can be edited without touching the input."""
    return {**traj, "observation": dict(traj["observation"])}


def _yaw_only(values: tf.Tensor) -> tf.Tensor:
    """`[T, 5]` `[xyz, yaw, gripper]` -> `[T, 7]` `[xyz, yaw, 0, 0, gripper]` (yaw kept in the 4th slot)."""
    return tf.concat([values[:, :4], tf.zeros_like(values[:, :2]), values[:, -1:]], axis=-1)


@register("nyu_franka_play_dataset_converted_externally_to_rlds")
def nyu_franka_play(traj: Trajectory) -> Trajectory:
    """15-D action `[joint vel (7), xyz, rpy, gripper, terminate]` -> `[xyz, rpy, clip(gripper, 0, 1)]`.

    Depth maps lose their channel axis and become float32; `eef_state` = last 6 state dims (xyz, rpy).
    """
    out = _copy(traj)
    obs = traj["observation"]
    for key in ("depth", "depth_additional_view"):
        out["observation"][key] = tf.cast(obs[key][..., 0], tf.float32)
    out["observation"]["eef_state"] = obs["state"][:, -6:]
    actions = traj["action"]
    out["action"] = tf.concat([actions[:, -8:-2], tf.clip_by_value(actions[:, -2:-1], 0.0, 1.0)], axis=-1)
    return out


@register("maniskill_dataset_converted_externally_to_rlds")
def maniskill(traj: Trajectory) -> Trajectory:
    """Action unchanged; `gripper_state` = state dim 7 (first finger position)."""
    out = _copy(traj)
    out["observation"]["gripper_state"] = traj["observation"]["state"][..., 7:8]
    return out


@register("furniture_bench_dataset_converted_externally_to_rlds")
def furniture_bench(traj: Trajectory) -> Trajectory:
    """8-D action `[xyz, quaternion (x, y, z, w), gripper (+1 close)]` -> `[xyz, rpy, 1 = open]`.

    `state` (35-D) becomes `[EEF xyz, EEF quaternion, gripper width]`.
    """
    out = _copy(traj)
    state = traj["observation"]["state"]
    out["observation"]["state"] = tf.concat([state[:, :7], state[:, -1:]], axis=-1)
    actions = traj["action"]
    gripper = invert_gripper_actions(tf.clip_by_value(actions[:, -1:], 0.0, 1.0))
    out["action"] = tf.concat([actions[:, :3], euler_from_quaternion(actions[:, 3:7]), gripper], axis=-1)
    return out


@register("cmu_franka_exploration_dataset_converted_externally_to_rlds")
def cmu_franka_exploration(traj: Trajectory) -> Trajectory:
    """8-D action `[xyz, orientation, gripper, terminate]` -> drop `terminate`."""
    out = _copy(traj)
    out["action"] = traj["action"][:, :-1]
    return out


@register("bc_z")
def bc_z(traj: Trajectory) -> Trajectory:
    """Action from the first of the 10 future steps: xyz residual, axis-angle residual, inverted `target_close`.

    The instruction lives in `observation/natural_language_instruction`.
    """
    out = _copy(traj)
    act = traj["action"]
    target_close = tf.cast(act["future/target_close"][:, :1], tf.float32)
    out["action"] = tf.concat([act["future/xyz_residual"][:, :3], act["future/axis_angle_residual"][:, :3],
                               invert_gripper_actions(target_close)], axis=-1)
    out["language_instruction"] = traj["observation"]["natural_language_instruction"]
    return out


@register("robo_net")
def robo_net(traj: Trajectory) -> Trajectory:
    """5-D action / state `[xyz, yaw, gripper]` padded to 7-D with zero rotation; gripper passed through."""
    out = _copy(traj)
    state = traj["observation"]["state"]
    out["observation"]["eef_state"] = tf.concat([state[:, :4], tf.zeros_like(state[:, :2])], axis=-1)
    out["observation"]["gripper_state"] = state[:, -1:]
    out["action"] = _yaw_only(traj["action"])
    return out


@register("berkeley_mvp_converted_externally_to_rlds", "berkeley_rpt_converted_externally_to_rlds")
def berkeley_mvp_rpt(traj: Trajectory) -> Trajectory:
    """JOINT_POS datasets (8-D joint-delta action, left unchanged; VLA training refuses them).

    The scalar bool `gripper` observation becomes float32 `[T, 1]` so that it concatenates into the proprio state.
    """
    out = _copy(traj)
    out["observation"]["gripper"] = tf.cast(traj["observation"]["gripper"], tf.float32)[:, None]
    return out


@register("kaist_nonprehensile_converted_externally_to_rlds")
def kaist_nonprehensile(traj: Trajectory) -> Trajectory:
    """20-D action -> EEF residuals (6) + a constant 0 gripper; `state` cut to the EEF pose (xyz, quaternion)."""
    out = _copy(traj)
    out["observation"]["state"] = traj["observation"]["state"][:, -7:]
    actions = traj["action"]
    out["action"] = tf.concat([actions[:, :6], tf.zeros_like(actions[:, :1])], axis=-1)
    return out


@register("stanford_mask_vit_converted_externally_to_rlds")
def stanford_mask_vit(traj: Trajectory) -> Trajectory:
    """Like RoboNet, but the EEF / gripper state comes from `end_effector_pose`."""
    out = _copy(traj)
    pose = traj["observation"]["end_effector_pose"]
    out["observation"]["eef_state"] = tf.concat([pose[:, :4], tf.zeros_like(pose[:, :2])], axis=-1)
    out["observation"]["gripper_state"] = pose[:, -1:]
    out["action"] = _yaw_only(traj["action"])
    return out


@register("asu_table_top_converted_externally_to_rlds")
def asu_table_top(traj: Trajectory) -> Trajectory:
    """Action unchanged; `eef_state` from `ground_truth_states/EE`, `gripper_state` = last state dim."""
    out = _copy(traj)
    out["observation"]["eef_state"] = traj["ground_truth_states"]["EE"]
    out["observation"]["gripper_state"] = traj["observation"]["state"][:, -1:]
    return out
