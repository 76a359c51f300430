"""DLR datasets (SARA pour, SARA grid clamp, EDAN shared control): 7-D EEF actions."""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.standardize.common import invert_gripper_actions
from vla_train.data.tf_setup import tf


def _copy(traj: Trajectory) -> Trajectory:
    """A shallow copy whose `observation` dict can be edited without touching the input."""
    return {**traj, "observation": dict(traj["observation"])}


@register("dlr_sara_pour_converted_externally_to_rlds")
def dlr_sara_pour(traj: Trajectory) -> Trajectory:
    """Already standard: 7-D action, 6-D `state` read directly by the config."""
    return _copy(traj)


@register("dlr_sara_grid_clamp_converted_externally_to_rlds")
def dlr_sara_grid_clamp(traj: Trajectory) -> Trajectory:
    """`state` (12-D: pose then wrench) cut to the 6-D EEF pose; action unchanged."""
    out = _copy(traj)
    out["observation"]["state"] = traj["observation"]["state"][:, :6]
    return out


@register("dlr_edan_shared_control_converted_externally_to_rlds")
def dlr_edan_shared_control(traj: Trajectory) -> Trajectory:
    """Gripper recorded as 1 = closed: inverted (no clipping) so that 1 = open."""
    out = _copy(traj)
    actions = traj["action"]
    out["action"] = tf.concat([actions[:, :6], invert_gripper_actions(actions[:, -1:])], axis=-1)
    return out
