"""DLR transforms on synthetic trajectories with the TFDS catalog's feature structures."""

import numpy as np

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.tf_setup import tf

T = 10
INSTRUCTION = "pour into the mug"


def rlds_steps(state_dim: int) -> dict:
    """The catalog's step features of the three DLR datasets; they differ only in the state size."""
    return {"action": Feature((7,)), "discount": Feature(), "is_first": Feature(dtype="bool"),
            "is_last": Feature(dtype="bool"), "is_terminal": Feature(dtype="bool"),
            "language_embedding": Feature((512,)), "language_instruction": Feature(dtype="string"),
            "observation": {"image": Feature(dtype="image"), "state": Feature((state_dim,))}, "reward": Feature()}


def run(name: str, state_dim: int, gripper: np.ndarray | None = None) -> tuple[dict, dict]:
    traj = synthetic_trajectory(rlds_steps(state_dim), length=T, instruction=INSTRUCTION)
    if gripper is not None:
        action = traj["action"].numpy().copy()
        action[:, -1] = gripper
        traj["action"] = tf.constant(action)
    out = run_in_graph(get_standardize_transform(name), traj)
    check_standardized(out, T)
    assert set(out["language_instruction"].tolist()) == {INSTRUCTION.encode()}
    assert "image" in out["observation"]
    return {"action": traj["action"].numpy(), "state": traj["observation"]["state"].numpy()}, out


def test_dlr_sara_pour():
    raw, out = run("dlr_sara_pour_converted_externally_to_rlds", 6)
    np.testing.assert_allclose(out["action"], raw["action"])
    np.testing.assert_allclose(out["observation"]["state"], raw["state"])


def test_dlr_sara_grid_clamp():
    raw, out = run("dlr_sara_grid_clamp_converted_externally_to_rlds", 12)
    np.testing.assert_allclose(out["action"], raw["action"])
    assert out["observation"]["state"].shape == (T, 6)  # the wrench (last 6) is dropped
    np.testing.assert_allclose(out["observation"]["state"], raw["state"][:, :6])


def test_dlr_edan_shared_control_inverts_without_clipping():
    gripper = np.array([0.0, 1.0, 1.0, 0.0, 0.25, 0.0, 1.0, 1.0, 0.0, 0.0], np.float32)  # raw: 1 = closed
    raw, out = run("dlr_edan_shared_control_converted_externally_to_rlds", 7, gripper)
    np.testing.assert_allclose(out["action"][:, :6], raw["action"][:, :6])
    np.testing.assert_allclose(out["action"][:, 6], 1.0 - gripper)
    np.testing.assert_allclose(out["observation"]["state"], raw["state"])
