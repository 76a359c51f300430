"""CALVIN transform (`vla_train/data/standardize/calvin.py`), VLA-Adapter's `calvin_dataset_transform`.

Structure of the CALVIN ABC RLDS conversion VLA-Adapter reads: steps/observation/{rgb_static, rgb_gripper, state
float32[15]}; steps/action float32[7] (gripper -1 close .. +1 open); steps/language_instruction.
"""

import numpy as np

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.tf_setup import tf

T = 6
FLAG = Feature(dtype="bool")
CALVIN = {
    "observation": {"rgb_static": Feature(dtype="image"), "rgb_gripper": Feature(dtype="image"),
                    "state": Feature((15,))},
    "action": Feature((7,)),
    "discount": Feature(), "reward": Feature(), "is_first": FLAG, "is_last": FLAG, "is_terminal": FLAG,
    "language_instruction": Feature(dtype="string"),
    "traj_metadata": {"episode_metadata": {"file_path": Feature(dtype="string")}},
}


def test_calvin_abc():
    traj = synthetic_trajectory(CALVIN, T, instruction="open the drawer")
    action = traj["action"].numpy().copy()
    action[:, 6] = [-1.0, 1.0, 0.5, -0.3, 1.4, 0.0]
    traj["action"] = tf.constant(action)
    raw = tf.nest.map_structure(lambda x: x.numpy(), traj)
    out = run_in_graph(get_standardize_transform("calvin_abc"), traj)
    check_standardized(out, T)
    np.testing.assert_allclose(out["action"][:, :6], action[:, :6])
    np.testing.assert_allclose(out["action"][:, 6], [0.0, 1.0, 0.5, 0.0, 1.0, 0.0])  # clipped, not inverted
    state = raw["observation"]["state"]
    np.testing.assert_allclose(out["observation"]["EEF_state"], state[:, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], np.stack([state[:, 6], state[:, -1]], axis=1))
    assert {"rgb_static", "rgb_gripper"} <= set(out["observation"])
