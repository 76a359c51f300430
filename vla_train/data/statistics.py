"""Per-dataset action / proprio statistics: computed once on the training split, cached by content, exported.

Statistics (facts §7.3): per-dimension `mean`, `std` (population), `max`, `min`, `q01`, `q99` (linear quantiles), plus
`num_transitions` and `num_trajectories`. Unlike the reference they cover the training split only, and the cache key
hashes the dataset's own metadata (`dataset_info.json`, `features.json`), the name, size and modification time of each
record file (replaced data invalidates the cache), the split, the YAML entry and the standardization code — never the
dataset's path, so moving a dataset (`mv` keeps sizes and times) keeps its cache. The cache also holds how many steps
and trajectories carry a language instruction (`LABEL_KEYS`, checked while planning; not exported). Only the main
process computes; the others wait on the caller's barrier and read the file.
"""

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vla_train.data.registry import DatasetSpec
from vla_train.log import logger

STATS_FORMAT_VERSION = "vla-train-stats-2"  # 2: label counts, record files in the key
STAT_KEYS = ("mean", "std", "max", "min", "q01", "q99")
# steps / trajectories with a non-empty instruction: in the cache, not in the exported statistics
LABEL_KEYS = ("num_labeled_transitions", "num_labeled_trajectories")
RECORD_FILE_PATTERNS = ("*.tfrecord*", "*.array_record*", "*.riegeli*")
USER_CACHE_DIR = Path(os.environ.get("VLA_TRAIN_CACHE", Path.home() / ".cache" / "vla_train"))


def summarize(values: np.ndarray) -> dict[str, list[float]]:
    """`[N, D]` -> the six per-dimension statistics (float64 computation, lists for JSON)."""
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "max": values.max(0).tolist(),
        "min": values.min(0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def compute_statistics(trajectories: Iterable[dict[str, np.ndarray]], dataset_name: str = "") -> dict[str, Any]:
    """Statistics over trajectories `{"action": [T, A], "proprio": [T, P] (optional), "labeled": [T] bool (optional:
    which steps have a non-empty instruction; adds the `LABEL_KEYS` counts)}`.

    Raises if any action or proprio value is NaN or infinite, with the count (drop such trajectories explicitly with
    the pipeline's `drop_nonfinite` option instead).
    """
    actions, proprios, num_trajectories = [], [], 0
    labels: dict[str, int] = {}
    for trajectory in trajectories:
        actions.append(np.asarray(trajectory["action"], dtype=np.float32))
        if "proprio" in trajectory:
            proprios.append(np.asarray(trajectory["proprio"], dtype=np.float32))
        if "labeled" in trajectory:
            labeled = int(np.count_nonzero(trajectory["labeled"]))
            labels[LABEL_KEYS[0]] = labels.get(LABEL_KEYS[0], 0) + labeled
            labels[LABEL_KEYS[1]] = labels.get(LABEL_KEYS[1], 0) + int(labeled > 0)
        num_trajectories += 1
    if not actions:
        raise ValueError(f"Dataset {dataset_name!r} has no trajectories in its training split.")
    action = np.concatenate(actions)
    proprio = np.concatenate(proprios) if proprios else np.zeros_like(action)
    for key, values in (("action", action), ("proprio", proprio)):
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise ValueError(f"Dataset {dataset_name!r}: {bad} non-finite (NaN/inf) {key} values in "
                             f"{num_trajectories} trajectories. Fix the data, or pass drop_nonfinite=True to skip "
                             f"the trajectories that contain them.")
    return {"action": summarize(action), "proprio": summarize(proprio), "num_transitions": int(action.shape[0]),
            "num_trajectories": num_trajectories, **labels}


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


def _candidate_paths(dataset_dir: Path, fingerprint: str) -> list[Path]:
    name = f"dataset_statistics_{fingerprint}.json"
    return [dataset_dir / name, USER_CACHE_DIR / name]


def _write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


def load_or_compute_statistics(
    dataset_dir: Path,
    fingerprint: str,
    compute: Callable[[], dict[str, Any]],
    *,
    is_main_process: bool = True,
    barrier: Callable[[], None] | None = None,
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Cached statistics, else the main process computes and caches them while the others wait at `barrier`.

    A cache file that lacks a `required` key (written by an older version) is stale: it is recomputed and replaced.
    Collective when `barrier` is given: call on every rank.
    """
    def cached() -> dict[str, Any] | None:
        for path in _candidate_paths(dataset_dir, fingerprint):
            if path.is_file():
                content = json.loads(path.read_text())
                missing = [key for key in required if key not in content]
                if not missing:
                    return content
                logger.info("Statistics cache %s lacks %s (an older version wrote it); recomputing", path, missing)
        return None

    stats = cached()
    if stats is None and is_main_process:
        logger.info("Computing statistics of %s (training split; cached for later runs)", dataset_dir)
        stats = compute()
        for path in _candidate_paths(dataset_dir, fingerprint):
            try:
                _write_json_atomically(path, stats)
                break
            except OSError:
                continue
    if barrier is not None:
        barrier()
    if stats is None:
        stats = cached()
        if stats is None:
            raise RuntimeError(f"Statistics for {dataset_dir} were not written by the main process.")
    return stats


def save_dataset_statistics(statistics: dict[str, dict[str, Any]], run_dir: str | Path) -> Path:
    """Write `run_dir/dataset_statistics.json` in the reference layout (with `mask`); returns the path."""
    path = Path(run_dir) / "dataset_statistics.json"
    content = {name: _json_ready(stats) for name, stats in statistics.items()}
    _write_json_atomically(path, content)
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
