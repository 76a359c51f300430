"""One job per run directory: `run_dir/run.lock` holds the owner's host, pid and start time.

Two jobs writing the same run directory (or the orphaned ranks of a killed launcher next to a restarted job) would
interleave metrics and race on checkpoints. The lock is created with `O_CREAT | O_EXCL` (atomic on local and NFS v3+
file systems) by rank 0 before anything else is written and removed when the run ends. A lock whose owner is gone is
stale: on the same host that is decided by the pid (and the process start time, against pid reuse), and the lock is
taken over with a warning; a lock held from another host cannot be checked from here and is refused with the
command to remove it once that job is known to be dead.
"""

import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from vla_train.log import logger

LOCK_NAME = "run.lock"


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked (locked, holds another run, or disagrees with the resume)."""


def _owner_info() -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
            "started_utc": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")}


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and {"host", "pid", "started"} <= set(owner) else None


def _owner_alive(owner: dict[str, Any]) -> bool | None:
    """True / False for an owner on this host; None when it is on another host (cannot be checked)."""
    if owner["host"] != socket.gethostname():
        return None
    try:
        process = psutil.Process(int(owner["pid"]))
        # a process started after the lock was written is a reused pid, not the owner
        return process.is_running() and process.create_time() <= float(owner["started"]) + 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def describe_owner(owner: dict[str, Any]) -> str:
    return f"pid {owner['pid']} on host {owner['host']} since {owner.get('started_utc', owner['started'])}"


@dataclass
class RunDirLock:
    path: Path
    owner: dict[str, Any]

    def release(self) -> None:
        """Remove the lock if it is still this process's (never another job's)."""
        if _read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def _create(path: Path, owner: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        json.dump(owner, file)
        file.flush()
        os.fsync(file.fileno())
    return True


def acquire_run_lock(run_dir: Path, *, unreadable_grace_s: float = 30.0) -> RunDirLock:
    """Take `run_dir/run.lock` (creating `run_dir`); a `RunDirectoryError` names the holder when it is in use.

    An unreadable lock younger than `unreadable_grace_s` is being written by another job; older, it is stale.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    owner = _owner_info()
    for _ in range(3):
        if _create(path, owner):
            return RunDirLock(path, owner)
        holder = _read_owner(path)
        if holder is None:
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < unreadable_grace_s:
                raise RunDirectoryError(f"{run_dir} is being locked by another job right now ({path} is being "
                                        "written). Fix: wait for that job, or pass another --run_id.")
            logger.warning("Removing the unreadable stale lock %s (%.0f s old).", path, age)
        else:
            alive = _owner_alive(holder)
            if alive is None or alive:
                where = "on another host: it cannot be checked from here" if alive is None else "and it is running"
                raise RunDirectoryError(
                    f"{run_dir} is in use by another job: {path} is held by {describe_owner(holder)} ({where}). "
                    f"Two jobs in one run directory would interleave metrics and checkpoints. Fix: wait for that job "
                    f"to end, pass another --run_id, or, if that job is dead, delete {path} and start again.")
            logger.warning("Taking over the stale lock %s: its owner (%s) is no longer running.", path,
                           describe_owner(holder))
        path.unlink(missing_ok=True)
    raise RunDirectoryError(f"Could not take the lock {path}: other jobs keep taking it. Fix: pass another --run_id.")
