"""UC San Diego transforms on synthetic trajectories with the TFDS catalog's feature structures."""

import numpy as np

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import get_standardize_transform

T = 10
INSTRUCTION = "pick up the red object"


def rlds_steps(action_dim: int, state_dim: int) -> dict:
    """The catalog's step features of the two UCSD datasets; they differ in action and state sizes."""
    return {"action": Feature((action_dim,)), "discount": Feature(), "is_first": Feature(dtype="bool"),
            "is_last": Feature(dtype="bool"), "is_terminal": Feature(dtype="bool"),
            "language_embedding": Feature((512,)), "language_instruction": Feature(dtype="string"),
            "observation": {"image": Feature(dtype="image"), "state": Feature((state_dim,))}, "reward": Feature()}


def run(name: str, action_dim: int, state_dim: int) -> tuple[dict, dict]:
    traj = synthetic_trajectory(rlds_steps(action_dim, state_dim), length=T, instruction=INSTRUCTION)
    out = run_in_graph(get_standardize_transform(name), traj)
    check_standardized(out, T)
    assert set(out["language_instruction"].tolist()) == {INSTRUCTION.encode()}
    assert "image" in out["observation"]
    return {"action": traj["action"].numpy(), "state": traj["observation"]["state"].numpy()}, out


def test_ucsd_kitchen():
    raw, out = run("ucsd_kitchen_dataset_converted_externally_to_rlds", 8, 21)
    np.testing.assert_allclose(out["action"], raw["action"][:, :7])  # terminate flag dropped
    np.testing.assert_allclose(out["observation"]["joint_state"], raw["state"][:, :7])


def test_ucsd_pick_and_place():
    raw, out = run("ucsd_pick_and_place_dataset_converted_externally_to_rlds", 4, 7)
    expected = np.concatenate([raw["action"][:, :3], np.zeros((T, 3), np.float32), raw["action"][:, 3:]], axis=1)
    np.testing.assert_allclose(out["action"], expected)
    np.testing.assert_allclose(out["observation"]["eef_state"], raw["state"][:, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], raw["state"][:, 6:7])
