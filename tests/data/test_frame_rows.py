"""Frames cross TensorFlow <-> Python as batches of numpy leaves (the shuffle buffer's rows) and leave TensorFlow in
batches (`numpy_frames`): same frames, same order, no serialization, rows that own their encoded bytes."""

import numpy as np
import pytest

from vla_train.data.frame_rows import FrameRows, numpy_frames
from vla_train.data.tf_setup import tf


def _frames(count: int, ragged: bool = False) -> tf.data.Dataset:
    """Frames shaped like the pipeline's (nested dict, encoded image bytes, a string scalar, numeric windows);
    `ragged`: the action's last dimension varies by frame (as in a mixture whose datasets differ)."""
    def make(i: tf.Tensor) -> dict:
        width = 7 + (i % 3 if ragged else 0)
        image = tf.strings.substr(tf.constant(["abcdefgh"]), 0, tf.cast(i % 5 + 1, tf.int32))  # [1], bytes vary
        return {"observation": {"image_primary": image,
                                "timestep": tf.fill([1], tf.cast(i, tf.int32))},
                "task": {"language_instruction": tf.strings.join(["task ", tf.strings.as_string(i)])},
                "action": tf.cast(tf.reshape(tf.range(width, dtype=tf.int64) + i, [1, width]), tf.float32)}
    return tf.data.Dataset.range(count).map(make)


def _as_lists(frame) -> dict:
    return tf.nest.map_structure(lambda x: x.tolist() if isinstance(x, np.ndarray) else x, frame)


@pytest.mark.parametrize("ragged", [False, True])
def test_frames_survive_the_crossing_unchanged(ragged):
    source = _frames(70, ragged)
    crossing = FrameRows(source.element_spec)
    assert crossing.dynamic == [ragged, False, False, False]  # flatten order: action, image, timestep, instruction
    rows = [row for batch in source.map(crossing.flatten).batch(32) for row in crossing.rows(batch)]
    assert len(rows) == 70
    assert all(isinstance(row[1][0], bytes) and isinstance(row[3], bytes) for row in rows)  # own bytes, not views
    serialized_action = len(rows[3][0]) if ragged else 0
    assert crossing.size_of(rows[3]) == len(rows[3][1][0]) + len(rows[3][3]) + serialized_action == 4 + 6 + \
        serialized_action
    batches = [crossing.stack(rows[i:i + 32]) for i in range(0, 70, 32)]
    back = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=crossing.signature)
    got = [_as_lists(frame) for frame in back.unbatch().map(crossing.unflatten).as_numpy_iterator()]
    assert got == [_as_lists(frame) for frame in source.as_numpy_iterator()]


def test_numpy_frames_keeps_order_and_length_and_gives_writable_arrays():
    source = _frames(70)
    got = list(numpy_frames(source, batch=32))  # two full batches and a partial one
    assert [_as_lists(frame) for frame in got] == [_as_lists(frame) for frame in source.as_numpy_iterator()]
    assert all(frame["action"].flags.writeable for frame in got)
    assert list(numpy_frames(source.take(0))) == []
