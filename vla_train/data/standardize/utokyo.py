"""University of Tokyo datasets: PR2 (fridge, tabletop), xArm (pick-and-place, bimanual) and LSMO.

Their gripper values are passed through unchanged, as the reference does.
"""

from vla_train.data.standardize import Trajectory, register


def _copy(traj: Trajectory) -> Trajectory:
    """A shallow copy whose `observation` dict can be edited without touching the input."""
    return {**traj, "observation": dict(traj["observation"])}


def _split_eef_gripper_state(out: Trajectory) -> None:
    """`eef_state` = first 6 state dims (xyz, rpy), `gripper_state` = last state dim."""
    state = out["observation"]["state"]
    out["observation"]["eef_state"] = state[:, :6]
    out["observation"]["gripper_state"] = state[:, -1:]


@register("utokyo_pr2_opening_fridge_converted_externally_to_rlds",
          "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds")
def utokyo_pr2(traj: Trajectory) -> Trajectory:
    """8-D action `[xyz, rpy, gripper, terminate]` -> drop `terminate`; EEF / gripper state split from `state`."""
    out = _copy(traj)
    _split_eef_gripper_state(out)
    out["action"] = traj["action"][:, :-1]
    return out


@register("utokyo_xarm_pick_and_place_converted_externally_to_rlds")
def utokyo_xarm_pick_and_place(traj: Trajectory) -> Trajectory:
    """Already standard: 7-D action; the config reads `end_effector_pose` directly."""
    return _copy(traj)


@register("utokyo_xarm_bimanual_converted_externally_to_rlds")
def utokyo_xarm_bimanual(traj: Trajectory) -> Trajectory:
    """14-D action `[left arm (7), right arm (7)]` -> the right arm's 7 dims."""
    out = _copy(traj)
    out["action"] = traj["action"][:, -7:]
    return out


@register("tokyo_u_lsmo_converted_externally_to_rlds")
def tokyo_u_lsmo(traj: Trajectory) -> Trajectory:
    """Action unchanged (7-D); EEF / gripper state split from the 13-D `state`."""
    out = _copy(traj)
    _split_eef_gripper_state(out)
    return out
