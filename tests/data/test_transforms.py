import numpy as np

from vla_train.data import trajectory as traj_ops
from vla_train.data.frames import REFERENCE_AUGMENTATION, _random_resized_crop, augment_image, decode_image, resize_uint8
from vla_train.data.tf_setup import tf


def _trajectory(length=5, dim=3, instructions=None):
    action = np.arange(length * dim, dtype=np.float32).reshape(length, dim) + 1
    return {
        "observation": {"timestep": tf.range(length), "image_primary": tf.constant([f"img{t}" for t in range(length)])},
        "task": {"language_instruction": tf.constant(instructions or ["go"] * length)},
        "action": tf.constant(action),
        "absolute_action_mask": tf.constant([[False] * (dim - 1) + [True]] * length),
    }


def test_chunking_floors_history_and_neutralizes_actions_past_the_end():
    out = traj_ops.chunk_actions_and_observations(_trajectory(), window_size=2, future_action_window_size=2)
    timesteps = out["observation"]["timestep"].numpy()
    np.testing.assert_array_equal(timesteps[0], [0, 0])
    np.testing.assert_array_equal(timesteps[3], [2, 3])
    np.testing.assert_array_equal(out["observation"]["pad_mask"].numpy()[0], [False, True])
    action = out["action"].numpy()
    assert action.shape == (5, 4, 3)
    np.testing.assert_array_equal(action[1, :, 0], [1, 4, 7, 10])  # steps 0..3
    # step 4: indices 3, 4, 5, 6 -> 5 and 6 are past the end: relative dims zero, the absolute gripper repeats
    np.testing.assert_array_equal(action[4, :, 0], [10, 13, 0, 0])
    np.testing.assert_array_equal(action[4, :, 2], [12, 15, 15, 15])


def test_window_one_keeps_reference_shapes():
    out = traj_ops.chunk_actions_and_observations(_trajectory())
    assert out["action"].shape == (5, 1, 3) and out["observation"]["image_primary"].shape == (5, 1)


def test_instruction_filters():
    labelled = _trajectory(instructions=["", "go", ""] + ["go"] * 2)
    assert bool(traj_ops.has_any_instruction(labelled))
    assert not bool(traj_ops.has_any_instruction(_trajectory(instructions=[""] * 5)))
    assert not bool(traj_ops.frame_has_instruction({"task": {"language_instruction": tf.constant("")}}))


def test_max_action_and_finite_filters():
    trajectory = _trajectory()
    assert bool(traj_ops.within_max_action(100.0)(trajectory))
    assert not bool(traj_ops.within_max_action(10.0)(trajectory))
    assert bool(traj_ops.all_finite(trajectory))
    bad = {**trajectory, "action": tf.constant([[np.nan, 0, 0]] * 5, tf.float32)}
    assert not bool(traj_ops.all_finite(bad))


def test_goal_relabeling_picks_later_steps():
    trajectory = _trajectory(length=8)
    out = traj_ops.relabel_goal_uniform(trajectory, tf.constant([1, 2], tf.int64))
    goals = out["task"]["timestep"].numpy()
    assert np.all(goals[:-1] > np.arange(7)) and goals[-1] == 7 and np.all(goals <= 7)


def test_subsample_is_seeded_and_ordered():
    trajectory = _trajectory(length=10)
    a = traj_ops.subsample(trajectory, 4, tf.constant([0, 1], tf.int64))
    b = traj_ops.subsample(trajectory, 4, tf.constant([0, 1], tf.int64))
    steps = a["observation"]["timestep"].numpy()
    assert len(steps) == 4 and np.all(np.diff(steps) > 0)
    np.testing.assert_array_equal(steps, b["observation"]["timestep"].numpy())


def test_decode_resizes_with_lanczos_and_blanks_missing_images():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    encoded = tf.io.encode_png(image)
    got = decode_image(encoded, (12, 12)).numpy()
    expected = np.clip(np.round(tf.image.resize(image.astype(np.float32), (12, 12), method="lanczos3",
                                                antialias=True).numpy()), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(resize_uint8(tf.constant(image), (12, 12)).numpy(), expected)
    assert not decode_image(tf.constant(""), (4, 4)).numpy().any()


def test_augmentation_is_seeded():
    image = tf.constant(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    seed = tf.constant([3, 4], tf.int64)
    a = augment_image(image, seed, REFERENCE_AUGMENTATION).numpy()
    b = augment_image(image, seed, REFERENCE_AUGMENTATION).numpy()
    c = augment_image(image, tf.constant([3, 5], tf.int64), REFERENCE_AUGMENTATION).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and a.dtype == np.uint8


def test_random_resized_crop_offsets_are_independent():
    """The reference drew both offsets from one seed, so crops slid along the diagonal; here they do not."""
    image = tf.reshape(tf.range(32 * 32, dtype=tf.float32), (32, 32, 1)) / 1024.0
    off_diagonal = 0
    for i in range(20):
        crop = _random_resized_crop(image, tf.constant([i, 7], tf.int64), [0.5, 0.5], [1.0, 1.0]).numpy()
        # the crop's top-left value encodes its (row, column) offset
        row, column = divmod(crop[0, 0, 0] * 1024.0, 32)
        off_diagonal += abs(row - column) > 1
    assert off_diagonal >= 10
