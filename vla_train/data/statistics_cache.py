"""Where a dataset's statistics cache lives and how the ranks of a run get it: rank 0 computes, the others poll.

- Location: `PipelineConfig.statistics_cache_dir/<dataset name>/` when set (it must be writable and, in multi-node
  runs, shared by every node), else next to the dataset. A read-only dataset directory falls back to the node-local
  `~/.cache/vla_train` (`VLA_TRAIN_CACHE`) with a warning in single-node runs; in multi-node runs that is an error
  naming the directory and `statistics_cache_dir` (the other nodes could not see the file).
- Waiting: the other ranks poll for the cache file (no collective, so no NCCL timeout) for up to
  `statistics_timeout_s`, logging what they wait for every few minutes. If rank 0 fails it writes a failure marker
  next to where the cache would be, and the waiting ranks raise `StatisticsFailedError` with its error at their next
  poll instead of hanging. A marker older than the process (a previous run's) is ignored.
"""

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from vla_train.atomic_io import atomic_write_json
from vla_train.log import logger

USER_CACHE_DIR = Path(os.environ.get("VLA_TRAIN_CACHE", Path.home() / ".cache" / "vla_train"))
MARKER_CLOCK_SLACK_S = 120.0  # a failure marker this much older than the process still counts (launch/clock skew)
POLL_S = 2.0  # seconds between two looks for the cache file (or a failure marker)
MESSAGE_EVERY_S = 300.0  # a waiting rank says what it waits for this often


class StatisticsFailedError(RuntimeError):
    """The main process failed to compute a dataset's statistics (raised on the ranks waiting for them)."""


class StatisticsTimeoutError(TimeoutError):
    """The statistics cache did not appear within `statistics_timeout_s`."""


def _writable(directory: Path) -> bool:
    """Whether a file can be created in `directory` (created if missing); tried, not guessed from permissions."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class StatisticsCache:
    """The cache file of one dataset's statistics (`fingerprint`: `statistics.statistics_fingerprint`)."""

    dataset: str
    dataset_dir: Path
    fingerprint: str
    cache_dir: Path | None = None  # PipelineConfig.statistics_cache_dir
    multi_node: bool = False  # world_size > local_world_size: a node-local fallback is an error
    required: tuple[str, ...] = ()  # keys a valid cache has (an older version's file lacks them)

    @property
    def file_name(self) -> str:
        return f"dataset_statistics_{self.fingerprint}.json"

    def read_dirs(self) -> list[Path]:
        """Where a valid cache may already be, in order."""
        if self.cache_dir is not None:
            return [Path(self.cache_dir) / self.dataset, self.dataset_dir]
        return [self.dataset_dir] if self.multi_node else [self.dataset_dir, USER_CACHE_DIR]

    def read(self) -> dict[str, Any] | None:
        """The cached statistics, or None (absent, or written by an older version without a `required` key)."""
        for directory in self.read_dirs():
            path = directory / self.file_name
            try:
                content = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            missing = [key for key in self.required if key not in content]
            if not missing:
                return content
            logger.info("Statistics cache %s lacks %s (an older version wrote it); recomputing", path, missing)
        return None

    def write_dir(self) -> Path:
        """Where the main process writes the cache (and a failure marker); the same answer, or error, on every rank."""
        if self.cache_dir is not None:
            directory = Path(self.cache_dir) / self.dataset
            if not _writable(directory):
                raise PermissionError(f"statistics_cache_dir {self.cache_dir}: cannot write {directory} (statistics "
                                      f"of dataset {self.dataset!r}); set statistics_cache_dir to a writable "
                                      f"directory every node shares.")
            return directory
        if _writable(self.dataset_dir):
            return self.dataset_dir
        if self.multi_node:
            raise PermissionError(
                f"Dataset {self.dataset!r}: its directory {self.dataset_dir} is read-only and holds no statistics "
                f"cache ({self.file_name}), and this multi-node run cannot fall back to the node-local "
                f"{USER_CACHE_DIR}. Set statistics_cache_dir to a directory every node shares (or precompute with "
                f"vla-scripts/compute_statistics.py --statistics_cache_dir <shared dir>).")
        logger.warning("Dataset %r: %s is read-only; caching its statistics in the node-local %s (set "
                       "statistics_cache_dir to share them across nodes).", self.dataset, self.dataset_dir,
                       USER_CACHE_DIR)
        return USER_CACHE_DIR

    def marker_path(self, directory: Path) -> Path:
        return directory / f"dataset_statistics_{self.fingerprint}.failed.json"

    def write(self, stats: dict[str, Any], directory: Path) -> Path:
        path = directory / self.file_name
        try:
            atomic_write_json(path, stats)
        except OSError as error:
            raise PermissionError(f"Cannot write the statistics cache of dataset {self.dataset!r} to {path} "
                                  f"({error}); set statistics_cache_dir to a writable shared directory.") from error
        self.marker_path(directory).unlink(missing_ok=True)
        return path

    def write_failure(self, error: BaseException, directory: Path) -> None:
        """Best effort: tell the waiting ranks that the main process failed, and why."""
        content = {"error": type(error).__name__, "message": str(error), "host": socket.gethostname(),
                   "pid": os.getpid(), "time": time.time()}
        try:
            atomic_write_json(self.marker_path(directory), content)
        except OSError as write_error:
            logger.error("Could not write the statistics failure marker %s (%s); the other ranks will wait until "
                         "statistics_timeout_s.", self.marker_path(directory), write_error)

    def read_failure(self, directory: Path, not_before: float) -> dict[str, Any] | None:
        """The failure marker, if one was written at or after `not_before` (a Unix time)."""
        try:
            content = json.loads(self.marker_path(directory).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return content if float(content.get("time", 0.0)) >= not_before else None


def process_start_time() -> float:
    """Unix time this process started (markers written before it, minus some slack, belong to an earlier run)."""
    return psutil.Process().create_time()


def wait_for_statistics(cache: StatisticsCache, directory: Path, timeout_s: float, *, poll_s: float | None = None,
                        message_every_s: float | None = None, not_before: float | None = None) -> dict[str, Any]:
    """Poll until the main process has written `cache` into `directory`; raise promptly when it reports a failure.

    `poll_s` / `message_every_s` default to `POLL_S` / `MESSAGE_EVERY_S`; markers before `not_before` (Unix time;
    default: this process's start minus `MARKER_CLOCK_SLACK_S`) are an earlier run's and ignored.
    """
    path = directory / cache.file_name
    poll_s = POLL_S if poll_s is None else poll_s
    message_every_s = MESSAGE_EVERY_S if message_every_s is None else message_every_s
    if not_before is None:
        not_before = process_start_time() - MARKER_CLOCK_SLACK_S
    start = time.monotonic()
    next_message = start
    while True:
        stats = cache.read()
        if stats is not None:
            return stats
        failure = cache.read_failure(directory, not_before)
        if failure is not None:
            raise StatisticsFailedError(
                f"The main process (host {failure.get('host')}, pid {failure.get('pid')}) failed to compute the "
                f"statistics of dataset {cache.dataset!r} ({cache.dataset_dir}): {failure.get('error')}: "
                f"{failure.get('message')} (failure marker {cache.marker_path(directory)}).")
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise StatisticsTimeoutError(
                f"Waited {waited:.0f} s for the statistics of dataset {cache.dataset!r} ({cache.dataset_dir}) at "
                f"{path}; the main process did not write them. Raise statistics_timeout_s (now {timeout_s:g}), or "
                f"precompute them with vla-scripts/compute_statistics.py.")
        if time.monotonic() >= next_message:
            logger.warning("Waiting for the main process to compute the statistics of dataset %r: expecting %s "
                           "(waited %.0f s of statistics_timeout_s=%g)", cache.dataset, path, waited, timeout_s)
            next_message += message_every_s
        time.sleep(poll_s)


def load_or_compute_statistics(cache: StatisticsCache, compute: Callable[[], dict[str, Any]], *,
                               is_main_process: bool = True, timeout_s: float = 6 * 3600.0,
                               poll_s: float | None = None) -> dict[str, Any]:
    """Cached statistics, else the main process computes and caches them while the others poll for the file.

    Call on every rank (no collective). A failure of the main process is written as a marker the others raise from.
    """
    stats = cache.read()
    if stats is not None:
        return stats
    directory = cache.write_dir()
    if not is_main_process:
        return wait_for_statistics(cache, directory, timeout_s, poll_s=poll_s)
    cache.marker_path(directory).unlink(missing_ok=True)  # an earlier run's
    logger.info("Computing statistics of %s (training split; cached in %s)", cache.dataset_dir, directory)
    try:
        stats = compute()
        cache.write(stats, directory)
    except BaseException as error:
        cache.write_failure(error, directory)
        raise
    return stats
