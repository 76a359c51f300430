"""Shared helpers of the standardization transforms (TensorFlow ops over a trajectory's time axis).

Gripper conventions after standardization: 1 = open, 0 = closed.
"""

from typing import Any

from vla_train.data.tf_setup import tf


def binarize_gripper_actions(actions: tf.Tensor) -> tf.Tensor:
    """`[T]` continuous gripper commands -> {0, 1}: > 0.95 is open (1), < 0.05 closed (0).

    An in-between value takes the value decided for the next step; a trailing run of in-between values takes the
    last raw command (the reference's backward scan).
    """
    actions = tf.cast(actions, tf.float32)
    is_open = tf.cast(actions > 0.95, tf.float32)
    in_between = tf.logical_not(tf.logical_or(actions > 0.95, actions < 0.05))

    def step(carry: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
        return tf.where(in_between[index], carry, is_open[index])

    return tf.scan(step, tf.range(tf.shape(actions)[0]), initializer=actions[-1], reverse=True)


def invert_gripper_actions(actions: tf.Tensor) -> tf.Tensor:
    """`1 - a`: flips a gripper convention (1 = closed -> 1 = open)."""
    return 1.0 - actions


def rel2abs_gripper_actions(actions: tf.Tensor) -> tf.Tensor:
    """`[T]` relative gripper commands (-1 open, +1 close, ~0 no change) -> absolute {0 closed, 1 open}.

    `a < -0.1` opens (+1), `a > 0.1` closes (-1); zeros carry the last command forward; before any command the
    gripper is assumed in the state opposite to the first command (open if there is none).
    """
    actions = tf.cast(actions, tf.float32)
    thresholded = tf.where(actions < -0.1, 1.0, tf.where(actions > 0.1, -1.0, 0.0))
    first = thresholded[tf.argmax(tf.cast(tf.not_equal(thresholded, 0.0), tf.int32))]
    start = tf.where(tf.equal(first, 0.0), 1.0, -first)

    def step(carry: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
        return tf.where(tf.equal(thresholded[index], 0.0), carry, thresholded[index])

    absolute = tf.scan(step, tf.range(tf.shape(actions)[0]), initializer=start)
    return absolute / 2.0 + 0.5


def relabel_bridge_actions(traj: dict[str, Any]) -> dict[str, Any]:
    """Actions from state differences: `[state[t+1, :6] - state[t, :6], gripper_action[t]]`; drops the last step."""
    movement = traj["observation"]["state"][1:, :6] - traj["observation"]["state"][:-1, :6]
    truncated = tf.nest.map_structure(lambda x: x[:-1], traj)
    truncated["action"] = tf.concat([movement, traj["action"][:-1, -1:]], axis=1)
    return truncated


def euler_from_quaternion(quaternion: tf.Tensor) -> tf.Tensor:
    """`[..., 4]` quaternions (x, y, z, w) -> `[..., 3]` roll, pitch, yaw (radians; R = Rz(yaw) Ry(pitch) Rx(roll))."""
    x, y, z, w = tf.unstack(tf.cast(quaternion, tf.float32), axis=-1)
    roll = tf.atan2(2.0 * (w * x + y * z), 1.0 - 2.0 * (x * x + y * y))
    pitch = tf.asin(tf.clip_by_value(2.0 * (w * y - z * x), -1.0, 1.0))
    yaw = tf.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return tf.stack([roll, pitch, yaw], axis=-1)
