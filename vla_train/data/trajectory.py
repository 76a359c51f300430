"""Trajectory-level transforms (facts §7.4): filters, goal relabeling, action/observation chunking, subsampling.

All randomness is stateless and seeded per trajectory (`seed` = `[base seed, trajectory index]`), so a deterministic
pipeline is a pure function of its seeds.
"""

from typing import Any

from vla_train.data.tf_setup import tf


def has_any_instruction(trajectory: dict[str, Any]) -> tf.Tensor:
    """Keep a trajectory when any step has a non-empty instruction (`skip_unlabeled`)."""
    return tf.reduce_any(tf.strings.length(trajectory["task"]["language_instruction"]) > 0)


def frame_has_instruction(frame: dict[str, Any]) -> tf.Tensor:
    """Keep a frame only when its own instruction is non-empty (never "What action ... take to ?")."""
    return tf.strings.length(frame["task"]["language_instruction"]) > 0


def within_max_action(max_action: float):
    """Filter: every |action| <= max_action."""

    def keep(trajectory: dict[str, Any]) -> tf.Tensor:
        return tf.reduce_all(tf.abs(trajectory["action"]) <= max_action)

    return keep


def all_finite(trajectory: dict[str, Any]) -> tf.Tensor:
    """Filter: no NaN/inf action (or proprio)."""
    finite = tf.reduce_all(tf.math.is_finite(trajectory["action"]))
    if "proprio" in trajectory["observation"]:
        finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(trajectory["observation"]["proprio"])))
    return finite


def relabel_goal_uniform(trajectory: dict[str, Any], seed: tf.Tensor) -> dict[str, Any]:
    """For each step i, a goal index uniform in [i + 1, T) (T - 1 for the last step); goal observations go to `task`."""
    length = tf.shape(trajectory["action"])[0]
    start = tf.range(1, length + 1)
    u = tf.random.stateless_uniform([length], seed=seed)
    goal = tf.minimum(tf.cast(u * tf.cast(length - start, tf.float32), tf.int32) + start, length - 1)
    goal_observation = tf.nest.map_structure(lambda x: tf.gather(x, goal), trajectory["observation"])
    task = dict(trajectory["task"])
    for key, value in goal_observation.items():
        task[key] = value
    return {**trajectory, "task": task}


def chunk_actions_and_observations(trajectory: dict[str, Any], window_size: int = 1,
                                   future_action_window_size: int = 0) -> dict[str, Any]:
    """Observations `[T, window, ...]` (history, floored at step 0) and actions `[T, window + future, A]`.

    Action indices past the goal step (`task.timestep` when relabeled, else T - 1) are neutral: relative dimensions
    become 0 and absolute ones (the gripper, `absolute_action_mask`) repeat the last valid value.
    `observation.pad_mask` `[T, window]` marks real (not floored) history steps, and `action_pad_mask`
    `[T, window + future]` bool the real action steps: True for indices in [0, goal], False past the goal (the
    episode's end: neutral actions) and for history indices before step 0 (floored copies of step 0).
    """
    length = tf.shape(trajectory["action"])[0]
    steps = tf.range(length)[:, None]
    history = steps + tf.range(-window_size + 1, 1)[None, :]
    observation = tf.nest.map_structure(lambda x: tf.gather(x, tf.maximum(history, 0)), trajectory["observation"])
    observation["pad_mask"] = history >= 0
    action_index = steps + tf.range(-window_size + 1, 1 + future_action_window_size)[None, :]
    goal = trajectory["task"].get("timestep", tf.fill([length], length - 1))
    capped = tf.minimum(tf.maximum(action_index, 0), goal[:, None])
    action = tf.gather(trajectory["action"], capped)
    past_goal = (action_index > goal[:, None])[:, :, None]
    absolute = trajectory["absolute_action_mask"][:, None, :]
    action = tf.where(tf.logical_and(past_goal, tf.logical_not(absolute)), tf.zeros_like(action), action)
    action_pad_mask = tf.logical_and(action_index >= 0, action_index <= goal[:, None])
    return {**trajectory, "observation": observation, "action": action, "action_pad_mask": action_pad_mask}


def subsample(trajectory: dict[str, Any], length: int, seed: tf.Tensor) -> dict[str, Any]:
    """Keep `length` random steps (all when shorter), in time order."""
    total = tf.shape(trajectory["action"])[0]
    order = tf.random.experimental.stateless_shuffle(tf.range(total), seed=seed)
    keep = tf.sort(order[: tf.minimum(length, total)])
    return tf.nest.map_structure(lambda x: tf.gather(x, keep), trajectory)
