"""Read what the statistics need from (a shard of) a dataset's training split: the same code for training's
single pass and for `vla-scripts/compute_statistics.py`'s parallel readers, so both see the same values."""

from pathlib import Path

from vla_train.data.registry import DatasetSpec
from vla_train.data.rlds import Restructure, read_trajectories, split_for
from vla_train.data.statistics import StatisticsParts, statistics_fingerprint
from vla_train.data.tf_setup import tf


def statistics_key(builder, spec: DatasetSpec, dataset_dir: Path, drop_nonfinite: bool) -> tuple[str, str]:
    """`(split, fingerprint)` of a dataset's statistics: its training split and the cache key training uses."""
    split = split_for(builder, train=True)
    return split, statistics_fingerprint(dataset_dir, spec, split, extra=f"nonfinite={drop_nonfinite}")


def count_split_files(builder, split: str) -> int:
    """Record files the split reads (what `read_statistics_parts` can shard over)."""
    return len(builder.info.splits[split].file_instructions)


def read_statistics_parts(builder, spec: DatasetSpec, split: str, dataset_dir: Path, drop_nonfinite: bool,
                          shard: int = 0, num_shards: int = 1) -> StatisticsParts:
    """Actions, proprio and label counts of shard `shard` of `num_shards` (by file, as training shards ranks) of
    the split; trajectories with non-finite actions are dropped when `drop_nonfinite`."""
    restructure = Restructure(spec, camera_views=(), load_proprio=True)
    trajectories = read_trajectories(builder, split, shuffle_files=False, seed=0, rank=shard,
                                     world_size=num_shards).map(restructure).map(
        lambda t: {"action": t["action"], "proprio": t["observation"]["proprio"],
                   "labeled": tf.strings.length(t["task"]["language_instruction"]) > 0})
    if drop_nonfinite:
        trajectories = trajectories.filter(lambda t: tf.reduce_all(tf.math.is_finite(t["action"])))
    parts = StatisticsParts()
    try:
        for trajectory in trajectories.as_numpy_iterator():
            parts.add(trajectory)
    except tf.errors.DataLossError as error:
        raise ValueError(f"Dataset {spec.name!r} at {dataset_dir} has a corrupt file: "
                         f"{find_corrupt_files(dataset_dir)} ({error.message.splitlines()[0]}).") from error
    return parts


def find_corrupt_files(dataset_dir: Path) -> list[str]:
    """The TFRecord files of a dataset directory that fail to read."""
    corrupt = []
    for path in sorted(dataset_dir.glob("*.tfrecord*")):
        try:
            for _ in tf.data.TFRecordDataset(str(path)):
                pass
        except tf.errors.DataLossError:
            corrupt.append(str(path))
    return corrupt
