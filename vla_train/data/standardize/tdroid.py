"""T-DROID task datasets (`tdroid_*`): DROID-style Franka demos with a static camera and its depth image.

Raw steps: `action [7]` (6 end-effector deltas + a continuous gripper command, 1 = open) and
`observation/{static_image, static_depth_image, cartesian_position, gripper_position, ...}`.
"""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import binarize_gripper_actions
from vla_train.data.tf_setup import tf

TDROID_DATASETS = (
    "tdroid_carrot_in_bowl",
    "tdroid_pour_corn_in_pot",
    "tdroid_flip_pot_upright",
    "tdroid_move_object_onto_plate",
    "tdroid_knock_object_over",
    "tdroid_cover_object_with_towel",
)


@register(*TDROID_DATASETS)
def tdroid_transform(traj: Trajectory) -> Trajectory:
    """Binarized gripper; `EEF_state` = `cartesian_position[:, :6]`, `gripper_state` = last `gripper_position` dim."""
    traj = {**traj, "observation": dict(traj["observation"])}
    action = tf.cast(traj["action"], tf.float32)
    traj["action"] = tf.concat([action[:, :6], binarize_gripper_actions(action[:, -1])[:, None]], axis=1)
    obs = traj["observation"]
    obs["EEF_state"] = obs["cartesian_position"][:, :6]
    obs["gripper_state"] = obs["gripper_position"][:, -1:]
    return traj
