"""DROID: the full dataset (`droid`), the DROID-format fine-tuning set `droid_wipe`, and DROID's zero-action filter.

Raw DROID steps hold `action_dict/{cartesian_velocity [6], gripper_position [1], ...}` (float64, base frame; the
gripper position is 1 = closed) and `observation/{cartesian_position [6], gripper_position [1], exterior_image_1_left,
exterior_image_2_left, wrist_image_left, ...}`.
"""

from typing import Any

from vla_train.data.standardize import Trajectory, register, register_frame_filter
from vla_train.data.standardize.common import invert_gripper_actions
from vla_train.data.tf_setup import tf

EXTERIOR_IMAGE_KEYS = ("exterior_image_1_left", "exterior_image_2_left")

# Per-dimension 1st / 99th percentiles of DROID's first 6 action dimensions, fixed in the reference. The frame filter
# compares against the BOUNDS_Q99 image of a zero action under these constants, not the run's computed statistics.
DROID_ACTION_Q01 = (-0.7776297926902771, -0.5803514122962952, -0.5795090794563293,
                    -0.6464047729969025, -0.7041108310222626, -0.8895104378461838)
DROID_ACTION_Q99 = (0.7597932070493698, 0.5726242214441299, 0.7351000607013702,
                    0.6705610305070877, 0.6464948207139969, 0.8897542208433151)
ZERO_ACTION_TOLERANCE = 1e-5


def _base_frame_action_and_proprio(traj: Trajectory) -> Trajectory:
    """Action `[xyz velocity, rpy velocity, 1 - gripper position]` (float32); `observation/proprio` [T, 7]."""
    traj = {**traj, "observation": dict(traj["observation"])}
    velocity = tf.cast(traj["action_dict"]["cartesian_velocity"], tf.float32)
    gripper = invert_gripper_actions(tf.cast(traj["action_dict"]["gripper_position"], tf.float32))
    traj["action"] = tf.concat([velocity[:, :3], velocity[:, 3:6], gripper], axis=-1)
    obs = traj["observation"]
    obs["proprio"] = tf.concat([obs["cartesian_position"], obs["gripper_position"]], axis=-1)
    return traj


def _swap_seed(observation: dict[str, Any]) -> tf.Tensor:
    """A stateless-RNG seed `[2]` derived from the trajectory itself: a hash of the first frame of both exterior
    cameras' encoded bytes, and the trajectory length."""
    first_frames = tf.strings.join([observation[EXTERIOR_IMAGE_KEYS[0]][0], observation[EXTERIOR_IMAGE_KEYS[1]][0]])
    content_hash = tf.strings.to_hash_bucket_fast(first_frames, 2**62)
    length = tf.cast(tf.shape(observation[EXTERIOR_IMAGE_KEYS[0]])[0], tf.int64)
    return tf.stack([content_hash, length])


def swap_exterior_images(observation: dict[str, Any]) -> dict[str, Any]:
    """With probability 1/2, exchange the two exterior camera streams (one decision for the whole trajectory).

    Determinism: the reference draws from TF's unseeded stateful RNG, so its choice changes on every read and is not
    reproducible. Here the coin is `tf.random.stateless_uniform` seeded from the trajectory's content (`_swap_seed`):
    the same episode always gets the same assignment, independent of parallel map scheduling and of the run seed,
    while about half of all episodes are swapped. The cost is that one episode never shows both assignments across
    epochs; for DROID's ~76k episodes this is immaterial to the purpose (either camera may be the primary view).
    """
    first, second = (observation[key] for key in EXTERIOR_IMAGE_KEYS)
    swap = tf.random.stateless_uniform([], seed=_swap_seed(observation)) < 0.5
    first, second = tf.cond(swap, lambda: (second, first), lambda: (first, second))
    return {**observation, EXTERIOR_IMAGE_KEYS[0]: first, EXTERIOR_IMAGE_KEYS[1]: second}


@register("droid")
def droid_transform(traj: Trajectory) -> Trajectory:
    """Base-frame velocity action + inverted gripper position; exterior cameras swapped at random (see above)."""
    traj = _base_frame_action_and_proprio(traj)
    traj["observation"] = swap_exterior_images(traj["observation"])
    return traj


@register("droid_wipe")
def droid_finetuning_transform(traj: Trajectory) -> Trajectory:
    """As `droid`, without the camera swap (fine-tuning sets name one fixed exterior camera as primary)."""
    return _base_frame_action_and_proprio(traj)


def normalized_zero_action() -> tf.Tensor:
    """BOUNDS_Q99 normalization of a zero action under the DROID constants: `2 (0 - q01) / (q99 - q01 + 1e-8) - 1`."""
    q01 = tf.constant(DROID_ACTION_Q01, tf.float32)
    q99 = tf.constant(DROID_ACTION_Q99, tf.float32)
    return 2.0 * (0.0 - q01) / (q99 - q01 + 1e-8) - 1.0


@register_frame_filter("droid_zero_action")
def droid_zero_action_filter(frame: dict[str, Any]) -> tf.Tensor:
    """Keep a frame unless all its (normalized) actions are zero motions.

    Receives one flattened frame, after action normalization and chunking: `frame["action"]` is `[window, A]` (also
    accepted: `[A]`). Returns a scalar bool that is True when any of the first 6 dimensions of any action row differs
    from the normalized zero by more than 1e-5. The gripper dimension is ignored.
    """
    movement = tf.cast(frame["action"], tf.float32)[..., :6]
    return tf.reduce_any(tf.abs(movement - normalized_zero_action()) > ZERO_ACTION_TOLERANCE)
