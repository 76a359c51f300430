"""Open RLDS datasets with tensorflow-datasets and restructure trajectories into the pipeline's common format.

Trajectories are read with images still encoded (decoding happens per frame, after the shuffle). A restructured
trajectory (`[T, ...]` tensors) holds:
- `observation`: `image_<view>` (encoded bytes) per requested camera view, optional `depth_<view>`, optional
  `proprio` `[T, P]` float32, `timestep` `[T]` int32;
- `task`: `language_instruction` `[T]` string;
- `action` `[T, A]` float32; `dataset_name` `[T]` string; `absolute_action_mask` `[T, A]` bool.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from packaging.version import InvalidVersion, Version

from vla_train.data.registry import DatasetSpec
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.tf_setup import tf


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's directory is missing: `looked_at` is the path searched, `reason` a short why."""

    def __init__(self, message: str, looked_at: Path, reason: str) -> None:
        super().__init__(message)
        self.looked_at, self.reason = looked_at, reason


def find_dataset_dir(data_root: str | Path, spec: DatasetSpec) -> Path:
    """`<data_root>/<name>/<version>/` (the newest version when the spec pins none), with errors that say what exists."""
    data_root = Path(data_root)
    dataset_root = data_root / spec.name
    looked_at = dataset_root if spec.version is None else dataset_root / spec.version
    if not data_root.is_dir():
        raise DatasetNotFoundError(f"Data root {data_root} does not exist (looking for dataset {spec.name!r}).",
                                   looked_at, "the data root does not exist")
    if not dataset_root.is_dir():
        raise DatasetNotFoundError(f"Dataset {spec.name!r} not found: looked for {dataset_root}. Datasets present in "
                                   f"{data_root}: {datasets_present(data_root) or 'none'}.", looked_at,
                                   "no such directory" if spec.version is None else f"no directory {dataset_root}")
    versions = {}
    for child in dataset_root.iterdir():
        try:
            if (child / "dataset_info.json").is_file():
                versions[Version(child.name)] = child
        except InvalidVersion:
            continue
    present = sorted(str(v) for v in versions) or "none"
    if spec.version is not None:
        wanted = dataset_root / spec.version
        if not (wanted / "dataset_info.json").is_file():
            raise DatasetNotFoundError(f"Dataset {spec.name!r} has no version {spec.version} at {wanted}; versions "
                                       f"present: {present}.", wanted, f"no version {spec.version} (present: {present})")
        return wanted
    if not versions:
        raise DatasetNotFoundError(f"{dataset_root} holds no tfds version directory (<version>/dataset_info.json).",
                                   dataset_root, "no <version>/dataset_info.json inside")
    return versions[max(versions)]


def datasets_present(data_root: Path) -> list[str]:
    """Names of the tfds datasets (`<name>/<version>/dataset_info.json`) under a data root."""
    if not data_root.is_dir():
        return []
    return sorted(p.name for p in data_root.iterdir() if any(p.glob("*/dataset_info.json")))


def open_builder(dataset_dir: Path) -> tfds.core.DatasetBuilder:
    return tfds.builder_from_directory(str(dataset_dir))


def split_for(builder: tfds.core.DatasetBuilder, train: bool) -> str:
    """`train` / `val` when a val split exists, else `train[:95%]` / `train[95%:]`."""
    if "val" in builder.info.splits:
        return "train" if train else "val"
    return "train[:95%]" if train else "train[95%:]"


def held_out_episodes(builder: tfds.core.DatasetBuilder) -> int:
    """Episodes in the held-out split (0 when `train[95%:]` rounds to nothing, e.g. 10 episodes and no val split)."""
    return int(builder.info.splits[split_for(builder, train=False)].num_examples)


def read_trajectories(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    shuffle_files: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_parallel_reads: int | None = None,
) -> tf.data.Dataset:
    """Episodes of `split` for this rank (a disjoint shard per rank), steps moved to the top level, images encoded.

    Shards by file when the split has at least `world_size` files, else by episode.
    """
    by_file = world_size > 1 and _count_files(builder, split) >= world_size
    read_config = tfds.ReadConfig(
        shuffle_seed=seed,
        interleave_cycle_length=num_parallel_reads,
        num_parallel_calls_for_interleave_files=num_parallel_reads,
        input_context=tf.distribute.InputContext(world_size, rank, 1) if by_file else None,
        skip_prefetch=True,
        enable_ordering_guard=False,  # datasets written in order (disable_shuffling) are still read file-shuffled
    )
    dataset = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                                 decoders={"steps": tfds.decode.SkipDecoding()})
    if world_size > 1 and not by_file:
        dataset = dataset.shard(world_size, rank)
    return dataset.map(_flatten_episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _count_files(builder: tfds.core.DatasetBuilder, split: str) -> int:
    return len(builder.info.splits[split].file_instructions)


def _flatten_episode(episode: dict[str, Any]) -> dict[str, Any]:
    """`{"steps": {...}, "episode_metadata": {...}}` -> steps at the top level, metadata broadcast as traj_metadata."""
    episode = dict(episode)
    steps = dict(episode.pop("steps"))
    length = tf.shape(tf.nest.flatten(steps)[0])[0]
    metadata = episode
    if metadata:
        steps["traj_metadata"] = tf.nest.map_structure(
            lambda x: tf.repeat(tf.expand_dims(x, 0), length, axis=0), metadata)
    return steps


class Restructure:
    """A standardized, restructured trajectory (see module docstring) from a raw RLDS trajectory."""

    def __init__(self, spec: DatasetSpec, camera_views: Sequence[str] = ("primary",), load_depth: bool = False,
                 load_proprio: bool = False) -> None:
        for view in camera_views:
            if spec.image_obs_keys.get(view) is None:
                raise ValueError(
                    f"Dataset {spec.name!r} has no {view!r} camera (its image_obs_keys: {spec.image_obs_keys}); "
                    f"request other camera_views or drop the dataset (the reference silently fed black images).")
        self.spec, self.camera_views = spec, tuple(camera_views)
        self.load_depth, self.load_proprio = load_depth, load_proprio
        self.standardize = get_standardize_transform(spec.standardize)

    def __call__(self, trajectory: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        trajectory = self.standardize(trajectory)
        for key in ("observation", "action", "language_instruction"):
            if key not in trajectory:
                raise ValueError(f"Standardization {spec.standardize!r} of {spec.name!r} produced no {key!r}.")
        action = tf.cast(trajectory["action"], tf.float32)
        if action.shape.rank != 2 or action.shape[-1] != spec.action_dim:
            raise ValueError(f"Dataset {spec.name!r}: standardized actions have shape {action.shape}, but its YAML "
                             f"entry says action_dim={spec.action_dim} ({spec.action_encoding}); fix one of them.")
        length = tf.shape(action)[0]
        old = trajectory["observation"]
        observation: dict[str, Any] = {}
        for view in self.camera_views:
            observation[f"image_{view}"] = old[spec.image_obs_keys[view]]
        if self.load_depth:
            for view in self.camera_views:
                key = spec.depth_obs_keys.get(view)
                observation[f"depth_{view}"] = old[key] if key is not None else tf.repeat("", length)
        if self.load_proprio:
            columns = [tf.zeros((length, 1), tf.float32) if key is None else tf.cast(old[key], tf.float32)
                       for key in spec.state_obs_keys]
            observation["proprio"] = tf.concat(columns, axis=1) if columns else tf.zeros((length, 0), tf.float32)
        observation["timestep"] = tf.range(length, dtype=tf.int32)
        language = trajectory["language_instruction"]
        if language.dtype != tf.string:
            raise ValueError(f"Dataset {spec.name!r}: language_instruction must be strings, got {language.dtype}.")
        mask = tf.constant(spec.absolute_action_mask, tf.bool)
        return {
            "observation": observation,
            "task": {"language_instruction": language},
            "action": action,
            "dataset_name": tf.repeat(tf.constant(spec.name), length),
            "absolute_action_mask": tf.tile(mask[None], [length, 1]),
        }
