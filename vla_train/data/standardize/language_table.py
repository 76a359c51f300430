"""Language Table: planar 2-D end-effector deltas; the instruction is stored as NUL-padded Unicode code points."""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.tf_setup import tf


def decode_padded_code_points(codes: tf.Tensor) -> tf.Tensor:
    """`[T, L]` Unicode code points, NUL (0) padded -> `[T]` UTF-8 strings holding the text before the first NUL."""
    codes = tf.cast(codes, tf.int32)
    before_first_nul = tf.math.cumprod(tf.cast(tf.not_equal(codes, 0), tf.int32), axis=1)
    lengths = tf.reduce_sum(before_first_nul, axis=1)
    return tf.strings.unicode_encode(tf.RaggedTensor.from_tensor(codes, lengths=lengths), output_encoding="UTF-8")


@register("language_table")
def language_table_transform(traj: Trajectory) -> Trajectory:
    """`action = [dx, dy, 0, 0, 0, 0, 1]` (no z, no rotation, gripper always open); decoded instruction."""
    planar = tf.cast(traj["action"], tf.float32)
    length = tf.shape(planar)[0]
    out = {**traj, "observation": dict(traj["observation"])}
    out["action"] = tf.concat([planar, tf.zeros([length, 4], tf.float32), tf.ones([length, 1], tf.float32)], axis=-1)
    out["language_instruction"] = decode_padded_code_points(traj["observation"]["instruction"])
    return out
