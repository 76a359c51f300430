"""CALVIN in the RLDS conversion VLA-Adapter trains on (`calvin_abc`, split ABC; evaluated on D).

Raw steps: `action [7]` (6 end-effector deltas + gripper in [-1 close .. +1 open]),
`observation/{rgb_static, rgb_gripper, state [>= 8]}` (EEF pos 3, Euler 3, gripper width, ..., gripper action last).
"""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.tf_setup import tf


@register("calvin_abc")
def calvin_transform(traj: Trajectory) -> Trajectory:
    """Gripper clipped to [0, 1] (1 = open, as CALVIN's +1; not inverted); `EEF_state` = `state[:, :6]`,
    `gripper_state` = `[state[:, 6], state[:, -1]]` (VLA-Adapter's `calvin_dataset_transform`)."""
    traj = {**traj, "observation": dict(traj["observation"])}
    action = tf.cast(traj["action"], tf.float32)
    traj["action"] = tf.concat([action[:, :6], tf.clip_by_value(action[:, -1:], 0.0, 1.0)], axis=1)
    obs = traj["observation"]
    obs["EEF_state"] = obs["state"][:, :6]
    obs["gripper_state"] = tf.concat([obs["state"][:, 6:7], obs["state"][:, -1:]], axis=1)
    return traj
