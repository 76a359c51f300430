"""University of Tokyo transforms on synthetic trajectories with the TFDS catalog's feature structures."""

import numpy as np
import pytest

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import get_standardize_transform

T = 10
INSTRUCTION = "open the fridge door"


def rlds_steps(action_dim: int, observation: dict) -> dict:
    """The step features every catalog page below shares, with the dataset's action size and observation."""
    return {"action": Feature((action_dim,)), "discount": Feature(), "is_first": Feature(dtype="bool"),
            "is_last": Feature(dtype="bool"), "is_terminal": Feature(dtype="bool"),
            "language_embedding": Feature((512,)), "language_instruction": Feature(dtype="string"),
            "observation": observation, "reward": Feature()}


PR2 = rlds_steps(8, {"image": Feature(dtype="image"), "state": Feature((7,))})  # fridge and tabletop alike
XARM_PICK_PLACE = rlds_steps(7, {"end_effector_pose": Feature((6,)), "hand_image": Feature(dtype="image"),
                                 "image": Feature(dtype="image"), "image2": Feature(dtype="image"),
                                 "joint_state": Feature((14,)), "joint_trajectory": Feature((21,))})
XARM_BIMANUAL = rlds_steps(14, {"action_l": Feature((7,)), "action_r": Feature((7,)), "image": Feature(dtype="image"),
                                "pose_l": Feature((6,)), "pose_r": Feature((6,))})
LSMO = rlds_steps(7, {"image": Feature(dtype="image"), "state": Feature((13,))})


def run(name: str, structure: dict) -> tuple[dict, dict]:
    traj = synthetic_trajectory(structure, length=T, instruction=INSTRUCTION)
    out = run_in_graph(get_standardize_transform(name), traj)
    check_standardized(out, T)
    assert set(out["language_instruction"].tolist()) == {INSTRUCTION.encode()}
    obs = traj["observation"]
    return {"action": traj["action"].numpy()} | {k: v.numpy() for k, v in obs.items() if "image" not in k}, out


@pytest.mark.parametrize("name", ["utokyo_pr2_opening_fridge_converted_externally_to_rlds",
                                  "utokyo_pr2_tabletop_manipulation_converted_externally_to_rlds"])
def test_utokyo_pr2(name):
    raw, out = run(name, PR2)
    np.testing.assert_allclose(out["action"], raw["action"][:, :7])  # terminate flag dropped, gripper untouched
    np.testing.assert_allclose(out["observation"]["eef_state"], raw["state"][:, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["state"][:, 6:7])
    assert "image" in out["observation"]


def test_utokyo_xarm_pick_and_place():
    raw, out = run("utokyo_xarm_pick_and_place_converted_externally_to_rlds", XARM_PICK_PLACE)
    np.testing.assert_allclose(out["action"], raw["action"])
    np.testing.assert_allclose(out["observation"]["end_effector_pose"], raw["end_effector_pose"])
    assert set(out["observation"]) >= {"image", "image2", "hand_image"}


def test_utokyo_xarm_bimanual():
    raw, out = run("utokyo_xarm_bimanual_converted_externally_to_rlds", XARM_BIMANUAL)
    np.testing.assert_allclose(out["action"], raw["action"][:, 7:])  # the right arm
    np.testing.assert_allclose(out["observation"]["pose_r"], raw["pose_r"])


def test_tokyo_u_lsmo():
    raw, out = run("tokyo_u_lsmo_converted_externally_to_rlds", LSMO)
    np.testing.assert_allclose(out["action"], raw["action"])
    np.testing.assert_allclose(out["observation"]["eef_state"], raw["state"][:, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["state"][:, 12:13])
