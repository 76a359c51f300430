"""LIBERO simulation suites, in the no-op-filtered RLDS conversion (`libero_*_no_noops`).

Raw steps: `action [7]` (6 end-effector deltas + gripper command in [-1 open, +1 close]),
`observation/{image, wrist_image, state [8] (EEF pos 3, axis-angle 3, gripper qpos 2), joint_state [7]}`.
"""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import invert_gripper_actions
from vla_train.data.tf_setup import tf

LIBERO_DATASETS = ("libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops", "libero_10_no_noops")


@register(*LIBERO_DATASETS)
def libero_transform(traj: Trajectory) -> Trajectory:
    """Gripper clipped to [0, 1] then inverted (1 = open); `EEF_state` = `state[:, :6]`, `gripper_state` =
    `state[:, -2:]` (both finger positions)."""
    traj = {**traj, "observation": dict(traj["observation"])}
    action = tf.cast(traj["action"], tf.float32)
    gripper = invert_gripper_actions(tf.clip_by_value(action[:, -1:], 0.0, 1.0))
    traj["action"] = tf.concat([action[:, :6], gripper], axis=1)
    obs = traj["observation"]
    obs["EEF_state"] = obs["state"][:, :6]
    obs["gripper_state"] = obs["state"][:, -2:]
    return traj
