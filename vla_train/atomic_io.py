"""Atomic file writes, in one place: write a hidden temporary sibling, fsync it, rename it over the target. A reader
(or a process killed mid-write) sees the old content or all of the new, never half a file; the temporary file is
removed on failure. Used for run files, statistics, checkpoints and exports alike."""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(binary file)` on `path`'s temporary sibling, fsync, then rename it to `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text` (UTF-8)."""
    atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: Path, content: Any) -> None:
    """`content` as indented JSON with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save(obj)` written atomically: no half-written checkpoint at `path`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))
