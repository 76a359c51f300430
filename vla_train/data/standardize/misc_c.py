"""Open X-Embodiment datasets that need little or no reshaping: Stanford RoboCook, Imperial College Sawyer, UIUC
D3Fields, UT Austin MUTEX, Berkeley Fanuc, the Berkeley GNM navigation sets, FMB, Dobb-E, RoboSet and RH20T."""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import invert_gripper_actions
from vla_train.data.tf_setup import tf


def _copy(traj: Trajectory) -> Trajectory:
    return {**traj, "observation": dict(traj["observation"])}


def _clipped_inverted_gripper(action: tf.Tensor, keep: int) -> tf.Tensor:
    """`[action[:, :keep], 1 - clip(action[:, -1], 0, 1)]`: a gripper command with 1 = close (or in [-1, 1]) turned
    into 1 = open."""
    action = tf.cast(action, tf.float32)
    return tf.concat([action[:, :keep], invert_gripper_actions(tf.clip_by_value(action[:, -1:], 0.0, 1.0))], axis=-1)


@register("stanford_robocook_converted_externally_to_rlds")
def robocook_transform(traj: Trajectory) -> Trajectory:
    """State `[pos 3, euler 3, gripper 1]` -> `eef_state`, `gripper_state`; action unchanged."""
    traj = _copy(traj)
    obs = traj["observation"]
    obs["eef_state"] = obs["state"][:, :6]
    obs["gripper_state"] = obs["state"][:, -1:]
    traj["action"] = tf.cast(traj["action"], tf.float32)
    return traj


@register("imperialcollege_sawyer_wrist_cam")
def imperial_wrist_cam_transform(traj: Trajectory) -> Trajectory:
    """Drop the trailing terminate flag from the 8-D action."""
    traj = _copy(traj)
    traj["action"] = tf.cast(traj["action"][..., :-1], tf.float32)
    return traj


@register("uiuc_d3field")
def uiuc_d3field_transform(traj: Trajectory) -> Trajectory:
    """3-D displacement padded to `[dx, dy, dz, 0, 0, 0, 0]` (zero rotation; gripper constant 0)."""
    traj = _copy(traj)
    displacement = tf.cast(traj["action"], tf.float32)
    traj["action"] = tf.concat(
        [displacement, tf.zeros_like(displacement), tf.zeros_like(displacement[:, :1])], axis=-1)
    return traj


@register("utaustin_mutex")
def utaustin_mutex_transform(traj: Trajectory) -> Trajectory:
    """Keep `state[:, :8]` (joints + gripper); gripper action clipped to [0, 1] and inverted."""
    traj = _copy(traj)
    traj["observation"]["state"] = traj["observation"]["state"][:, :8]
    traj["action"] = _clipped_inverted_gripper(traj["action"], keep=6)
    return traj


@register("berkeley_fanuc_manipulation")
def berkeley_fanuc_transform(traj: Trajectory) -> Trajectory:
    """No gripper action is recorded: append `1 - gripper_state` (state column 6) to the 6-D motion action."""
    traj = _copy(traj)
    obs = traj["observation"]
    obs["joint_state"] = obs["state"][:, :6]
    obs["gripper_state"] = obs["state"][:, 6:7]
    gripper = invert_gripper_actions(tf.cast(obs["gripper_state"], tf.float32))
    traj["action"] = tf.concat([tf.cast(traj["action"], tf.float32), gripper], axis=-1)
    return traj


@register("berkeley_gnm_recon", "berkeley_gnm_cory_hall", "berkeley_gnm_sac_son")
def gnm_transform(traj: Trajectory) -> Trajectory:
    """Navigation: 2-D action padded to `[dx, dy, 0, 0, 0, 0, 0]`; `state` = `[position 2, 0, 0, 0, yaw 1]`."""
    traj = _copy(traj)
    obs = traj["observation"]
    obs["state"] = tf.concat([obs["position"], tf.zeros_like(obs["state"][:, :3]), obs["yaw"]], axis=-1)
    planar = tf.cast(traj["action"], tf.float32)
    traj["action"] = tf.concat(
        [planar, tf.zeros_like(planar), tf.zeros_like(planar), tf.zeros_like(planar[:, :1])], axis=-1)
    return traj


@register("fmb_dataset")
def fmb_transform(traj: Trajectory) -> Trajectory:
    """`proprio` = `[eef_pose 7, state_gripper_pose 1]`; action unchanged."""
    traj = _copy(traj)
    obs = traj["observation"]
    obs["proprio"] = tf.concat([obs["eef_pose"], obs["state_gripper_pose"][..., None]], axis=-1)
    traj["action"] = tf.cast(traj["action"], tf.float32)
    return traj


@register("dobbe")
def dobbe_transform(traj: Trajectory) -> Trajectory:
    """`proprio` = `state`; action unchanged."""
    traj = _copy(traj)
    traj["observation"]["proprio"] = traj["observation"]["state"]
    traj["action"] = tf.cast(traj["action"], tf.float32)
    return traj


@register("roboset")
def roboset_transform(traj: Trajectory) -> Trajectory:
    """JOINT_POS (8-D): 7 joint targets + gripper in [-1, 1] clipped to [0, 1] and inverted; `proprio` = `state`."""
    traj = _copy(traj)
    traj["observation"]["proprio"] = traj["observation"]["state"]
    traj["action"] = _clipped_inverted_gripper(traj["action"], keep=7)
    return traj


@register("rh20t")
def rh20t_transform(traj: Trajectory) -> Trajectory:
    """Action = `[action/tcp_base 6, action/gripper]`; `proprio` = `[observation/tcp_base 6, gripper_width]`."""
    traj = _copy(traj)
    tcp = tf.cast(traj["action"]["tcp_base"], tf.float32)
    gripper = tf.cast(traj["action"]["gripper"], tf.float32)[:, None]
    traj["action"] = tf.concat([tcp, gripper], axis=-1)
    obs = traj["observation"]
    obs["proprio"] = tf.concat([obs["tcp_base"], obs["gripper_width"][..., None]], axis=-1)
    return traj
