import numpy as np
import pytest

from vla_train.data.standardize import STANDARDIZE_TRANSFORMS, get_standardize_transform, register
from vla_train.data.standardize.common import (
    binarize_gripper_actions,
    euler_from_quaternion,
    invert_gripper_actions,
    rel2abs_gripper_actions,
    relabel_bridge_actions,
)
from vla_train.data.tf_setup import tf


def reference_binarize(a: np.ndarray) -> np.ndarray:
    out, carry = np.empty_like(a), a[-1]
    for i in range(len(a) - 1, -1, -1):
        carry = carry if 0.05 <= a[i] <= 0.95 else float(a[i] > 0.95)
        out[i] = carry
    return out


def reference_rel2abs(a: np.ndarray) -> np.ndarray:
    thresholded = np.where(a < -0.1, 1.0, np.where(a > 0.1, -1.0, 0.0))
    nonzero = thresholded[thresholded != 0]
    carry = -nonzero[0] if len(nonzero) else 1.0
    out = []
    for value in thresholded:
        carry = carry if value == 0 else value
        out.append(carry)
    return np.array(out) / 2 + 0.5


@pytest.mark.parametrize("seed", range(5))
def test_binarize_matches_backward_scan(seed):
    rng = np.random.default_rng(seed)
    a = rng.choice([0.0, 0.02, 0.5, 0.7, 0.97, 1.0], size=12).astype(np.float32)
    np.testing.assert_array_equal(binarize_gripper_actions(tf.constant(a)).numpy(), reference_binarize(a))


def test_binarize_examples():
    got = binarize_gripper_actions(tf.constant([1.0, 0.5, 0.0, 0.3, 0.6], tf.float32)).numpy()
    np.testing.assert_allclose(got, [1.0, 0.0, 0.0, 0.6, 0.6])  # trailing in-between run keeps the last raw value


@pytest.mark.parametrize("seed", range(5))
def test_rel2abs_matches_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.choice([-1.0, -0.05, 0.0, 0.05, 1.0], size=15).astype(np.float32)
    np.testing.assert_array_equal(rel2abs_gripper_actions(tf.constant(a)).numpy(), reference_rel2abs(a))
    assert rel2abs_gripper_actions(tf.zeros([4])).numpy().tolist() == [1.0] * 4


def test_invert():
    np.testing.assert_allclose(invert_gripper_actions(tf.constant([0.0, 0.25, 1.0])).numpy(), [1.0, 0.75, 0.0])


def test_relabel_bridge_actions():
    state = np.cumsum(np.ones((5, 7), np.float32), axis=0) * np.arange(1, 8, dtype=np.float32)
    traj = {"observation": {"state": tf.constant(state)}, "action": tf.constant(np.full((5, 7), 0.5, np.float32)),
            "language_instruction": tf.constant(["x"] * 5)}
    out = relabel_bridge_actions(traj)
    assert out["action"].shape == (4, 7) and out["language_instruction"].shape == (4,)
    np.testing.assert_allclose(out["action"].numpy()[:, :6], np.diff(state, axis=0)[:, :6])
    np.testing.assert_allclose(out["action"].numpy()[:, 6], 0.5)


def _rotation(roll, pitch, yaw):
    cx, sx, cy, sy, cz, sz = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _quaternion_xyzw(r):
    w = np.sqrt(max(0.0, 1 + r[0, 0] + r[1, 1] + r[2, 2])) / 2
    return np.array([(r[2, 1] - r[1, 2]) / (4 * w), (r[0, 2] - r[2, 0]) / (4 * w), (r[1, 0] - r[0, 1]) / (4 * w), w])


def test_euler_from_quaternion_inverts_rotation():
    rng = np.random.default_rng(0)
    angles = rng.uniform([-2.5, -1.2, -2.5], [2.5, 1.2, 2.5], size=(20, 3))
    quats = np.stack([_quaternion_xyzw(_rotation(*a)) for a in angles]).astype(np.float32)
    np.testing.assert_allclose(euler_from_quaternion(tf.constant(quats)).numpy(), angles, atol=1e-4)


def test_registry_lookup_and_duplicates():
    with pytest.raises(ValueError, match="Unknown standardization transform 'nope'"):
        get_standardize_transform("nope")

    @register("__test_transform__")
    def transform(traj):
        return traj

    assert STANDARDIZE_TRANSFORMS["__test_transform__"] is transform
    with pytest.raises(ValueError, match="registered twice"):
        register("__test_transform__")(lambda traj: traj)
    del STANDARDIZE_TRANSFORMS["__test_transform__"]
