"""Per-dataset action / proprio statistics: computed once on the training split, cached by content, exported.

Statistics (facts §7.3): per-dimension `mean`, `std` (population), `max`, `min`, `q01`, `q99` (linear quantiles), plus
`num_transitions` and `num_trajectories`. Unlike the reference they cover the training split only, and the cache key
hashes the dataset's own metadata (`dataset_info.json`, `features.json`), the name, size and modification time of each
record file (replaced data invalidates the cache), the split, the YAML entry and the standardization code — never the
dataset's path, so moving a dataset (`mv` keeps sizes and times) keeps its cache. The cache also holds how many steps
and trajectories carry a language instruction (`LABEL_KEYS`, checked while planning; not exported). Where the cache
lives and how ranks wait for it: `statistics_cache.py`; computing it ahead of training, in parallel:
`compute_statistics.py`.
"""

import hashlib
import inspect
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_train.atomic_io import atomic_write_json
from vla_train.data.registry import DatasetSpec

STATS_FORMAT_VERSION = "vla-train-stats-2"  # 2: label counts, record files in the key
STAT_KEYS = ("mean", "std", "max", "min", "q01", "q99")
# steps / trajectories with a non-empty instruction: in the cache, not in the exported statistics
LABEL_KEYS = ("num_labeled_transitions", "num_labeled_trajectories")
RECORD_FILE_PATTERNS = ("*.tfrecord*", "*.array_record*", "*.riegeli*")


def summarize(values: np.ndarray) -> dict[str, list[float]]:
    """`[N, D]` -> the six per-dimension statistics (float64 computation, lists for JSON).

    Each column is sorted first, so the result does not depend on the order of the rows: statistics merged from
    parallel readers (`vla-scripts/compute_statistics.py`) are bit-identical to a single pass over the split.
    """
    values = np.sort(np.asarray(values, dtype=np.float64), axis=0)
    return {
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "max": values.max(0).tolist(),
        "min": values.min(0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


@dataclass
class StatisticsParts:
    """What a reader of part of a split collects: its float32 actions and proprio, trajectory and label counts.

    Parts merge exactly (`merge_parts`): the quantiles need every value, so the values themselves are kept (float32,
    as training holds them: ~4 bytes x (action + proprio dims) per step).
    """

    actions: list[np.ndarray] = field(default_factory=list)
    proprios: list[np.ndarray] = field(default_factory=list)
    num_trajectories: int = 0
    labels: dict[str, int] = field(default_factory=dict)

    def add(self, trajectory: dict[str, np.ndarray]) -> None:
        """Add one trajectory (see `compute_statistics`)."""
        self.actions.append(np.asarray(trajectory["action"], dtype=np.float32))
        if "proprio" in trajectory:
            self.proprios.append(np.asarray(trajectory["proprio"], dtype=np.float32))
        if "labeled" in trajectory:
            labeled = int(np.count_nonzero(trajectory["labeled"]))
            self.labels[LABEL_KEYS[0]] = self.labels.get(LABEL_KEYS[0], 0) + labeled
            self.labels[LABEL_KEYS[1]] = self.labels.get(LABEL_KEYS[1], 0) + int(labeled > 0)
        self.num_trajectories += 1


def merge_parts(parts: Iterable[StatisticsParts]) -> StatisticsParts:
    """One `StatisticsParts` holding every value and count of `parts` (in any order: the statistics do not care)."""
    merged = StatisticsParts()
    for part in parts:
        merged.actions.extend(part.actions)
        merged.proprios.extend(part.proprios)
        merged.num_trajectories += part.num_trajectories
        for key, count in part.labels.items():
            merged.labels[key] = merged.labels.get(key, 0) + count
    return merged


def finalize_statistics(parts: StatisticsParts, dataset_name: str = "") -> dict[str, Any]:
    """The statistics of the collected values; raises on an empty split or non-finite values (with the count)."""
    if not parts.num_trajectories:
        raise ValueError(f"Dataset {dataset_name!r} has no trajectories in its training split.")
    action = np.concatenate(parts.actions)
    proprio = np.concatenate(parts.proprios) if parts.proprios else np.zeros_like(action)
    for key, values in (("action", action), ("proprio", proprio)):
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise ValueError(f"Dataset {dataset_name!r}: {bad} non-finite (NaN/inf) {key} values in "
                             f"{parts.num_trajectories} trajectories. Fix the data, or pass drop_nonfinite=True to "
                             f"skip the trajectories that contain them.")
    return {"action": summarize(action), "proprio": summarize(proprio), "num_transitions": int(action.shape[0]),
            "num_trajectories": parts.num_trajectories, **parts.labels}


def compute_statistics(trajectories: Iterable[dict[str, np.ndarray]], dataset_name: str = "") -> dict[str, Any]:
    """Statistics over trajectories `{"action": [T, A], "proprio": [T, P] (optional), "labeled": [T] bool (optional:
    which steps have a non-empty instruction; adds the `LABEL_KEYS` counts)}`.

    Raises if any action or proprio value is NaN or infinite, with the count (drop such trajectories explicitly with
    the pipeline's `drop_nonfinite` option instead).
    """
    parts = StatisticsParts()
    for trajectory in trajectories:
        parts.add(trajectory)
    return finalize_statistics(parts, dataset_name)


def without_label_counts(stats: dict[str, Any]) -> dict[str, Any]:
    """The statistics in the reference layout (the cache's `LABEL_KEYS` removed)."""
    return {key: value for key, value in stats.items() if key not in LABEL_KEYS}


def statistics_fingerprint(dataset_dir: Path, spec: DatasetSpec, split: str, extra: str = "") -> str:
    """sha256 over the dataset's metadata files, its record files' names, sizes and modification times, the split,
    the YAML entry and the standardization code."""
    from vla_train.data.standardize import get_standardize_transform

    parts = [STATS_FORMAT_VERSION, split, extra, spec.standardize, spec.action_encoding, repr(spec.state_obs_keys)]
    for filename in ("dataset_info.json", "features.json"):
        path = dataset_dir / filename
        if path.is_file():
            parts.append(_without_paths(path.read_text()))
    parts.extend(record_file_signatures(dataset_dir))
    transform = get_standardize_transform(spec.standardize)
    parts.append(inspect.getsource(inspect.getmodule(transform)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def record_file_signatures(dataset_dir: Path) -> list[str]:
    """`name size mtime_ns` of each record file: what a copy-in-place or regeneration of the data changes."""
    paths = sorted({path for pattern in RECORD_FILE_PATTERNS for path in dataset_dir.glob(pattern) if path.is_file()})
    signatures = []
    for path in paths:
        status = path.stat()
        signatures.append(f"{path.name} {status.st_size} {status.st_mtime_ns}")
    return signatures


def _without_paths(text: str) -> str:
    """dataset_info.json without location-dependent fields, so a moved dataset keeps its fingerprint."""
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return text
    for key in ("location", "dataDir", "downloadSize", "fileFormat"):
        info.pop(key, None)
    return json.dumps(info, sort_keys=True)


def save_dataset_statistics(statistics: dict[str, dict[str, Any]], run_dir: str | Path) -> Path:
    """Write `run_dir/dataset_statistics.json` in the reference layout (with `mask`); returns the path."""
    path = Path(run_dir) / "dataset_statistics.json"
    content = {name: _json_ready(stats) for name, stats in statistics.items()}
    atomic_write_json(path, content)
    return path


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value
