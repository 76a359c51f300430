"""Synthetic RLDS trajectories with a dataset's real feature structure, for testing standardization transforms.

A structure is a nested dict whose leaves are `Feature(shape, dtype)`; `shape` excludes the time axis. dtype is a
numpy dtype name, "string" (text: an instruction), or "image" (encoded bytes, as RLDS keeps images before decoding).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_train.data.tf_setup import tf


@dataclass(frozen=True)
class Feature:
    shape: tuple[int, ...] = ()
    dtype: str = "float32"


def synthetic_trajectory(structure: dict[str, Any], length: int = 10, seed: int = 0,
                         instruction: str = "pick up the red block") -> dict[str, Any]:
    """Eager tensors `[length, *shape]` for every leaf of `structure`."""
    rng = np.random.default_rng(seed)

    def make(feature: Feature) -> tf.Tensor:
        if feature.dtype == "string":
            return tf.constant([instruction] * length)
        if feature.dtype == "image":
            return tf.constant([b"\xff\xd8 encoded image bytes"] * length)
        if feature.dtype == "bool":
            return tf.constant(rng.random((length, *feature.shape)) > 0.5)
        if np.issubdtype(np.dtype(feature.dtype), np.integer):
            return tf.constant(rng.integers(0, 5, size=(length, *feature.shape)).astype(feature.dtype))
        return tf.constant(rng.uniform(-1, 1, size=(length, *feature.shape)).astype(feature.dtype))

    def walk(node: Any) -> Any:
        return {k: walk(v) for k, v in node.items()} if isinstance(node, dict) else make(node)

    return walk(structure)


def run_in_graph(fn, trajectory: dict[str, Any]) -> dict[str, Any]:
    """Apply `fn` inside a tf.data map (graph mode, as the pipeline does) and return numpy results."""
    dataset = tf.data.Dataset.from_tensors(trajectory).map(fn)
    return next(iter(dataset.as_numpy_iterator()))


def check_standardized(output: dict[str, Any], length: int, action_dim: int = 7) -> None:
    """The common contract every standardization transform satisfies."""
    assert output["action"].dtype == np.float32, output["action"].dtype
    assert output["action"].shape == (length, action_dim), output["action"].shape
    assert output["language_instruction"].shape == (length,)
    assert isinstance(output["observation"], dict)
    assert np.all(np.isfinite(output["action"]))


IMAGE = Feature(dtype="image")
TEXT = Feature(dtype="string")
FLAG = Feature(dtype="bool")
# the per-step fields of an externally converted Open-X dataset, besides observation and action
STEP_EXTRAS = {"discount": Feature(), "reward": Feature(), "is_first": FLAG, "is_last": FLAG, "is_terminal": FLAG,
               "language_embedding": Feature((512,)), "language_instruction": TEXT}
