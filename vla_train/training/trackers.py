"""Metric trackers, rank 0 only: `run_dir/<run_id>.jsonl` (+ `run-metrics.jsonl`) and W&B (offline without a key).

`run-metrics.jsonl` is appended to, not truncated, on a resumed run, and `<run_id>.jsonl` keeps each step once (the
lines after the resumed step are dropped, with a backup); the W&B run id is derived from the run directory
(`resume="allow"`), W&B logs offline when no API key is configured, and `finalize` never sleeps.
"""

import functools
import hashlib
import json
import netrc
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import jsonlines

from vla_train.atomic_io import atomic_write_text
from vla_train.config.train import TRACKERS
from vla_train.log import logger
from vla_train.training.checkpoint_io import utc_stamp
from vla_train.training.distributed import is_rank_zero

SIM_PREFIX = "Sim/"  # closed-loop evaluation metrics (vla_train/training/closed_loop.py) ...
SIM_STEP_KEY = "Sim/Step"  # ... and their x-axis: the evaluated checkpoint's step

# === Trackers (rank 0 only) ===


class Tracker(Protocol):
    def write_hyperparameters(self, hparams: dict) -> None: ...

    def write(self, global_step: int, metrics: dict[str, float]) -> None: ...

    def finalize(self) -> None: ...


class JSONLinesTracker:
    """`run_dir/run-metrics.jsonl` gets one `{"run_id", "hparams"}` line per (re)start; `run_dir/<run_id>.jsonl` one
    line of metrics per `write` (with `VLA Train/Step` = global step when the caller did not set it)."""

    def __init__(self, run_id: str, run_dir: str | Path, start_step: int | None = None) -> None:
        """`start_step`: the step a (re)started run continues from; metric lines of later steps, written by the
        interrupted run after its last checkpoint, are dropped (the file as it was is kept as a backup)."""
        self.run_id, self.run_dir = run_id, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._dumps = functools.partial(json.dumps, sort_keys=True, default=str)
        if start_step is not None:
            self._drop_after(start_step)

    def _drop_after(self, step: int) -> None:
        path = self.run_dir / f"{self.run_id}.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.strip() or _logged_step(line) <= step]
        if len(kept) == len(lines):
            return
        backup = path.with_name(f"{path.name}.before-resume-{utc_stamp()}")
        shutil.copy2(path, backup)
        atomic_write_text(path, "".join(kept))
        logger.warning("Resuming at step %d: dropped %d metric lines of later steps from %s (backup: %s).", step,
                       len(lines) - len(kept), path.name, backup.name)

    def _append(self, path: Path, record: dict) -> None:
        with jsonlines.open(path, mode="a", dumps=self._dumps) as writer:
            writer.write(record)

    def write_hyperparameters(self, hparams: dict) -> None:
        self._append(self.run_dir / "run-metrics.jsonl", {"run_id": self.run_id, "hparams": hparams})

    def write(self, global_step: int, metrics: dict[str, float]) -> None:
        self._append(self.run_dir / f"{self.run_id}.jsonl", {"VLA Train/Step": global_step, **metrics})

    def finalize(self) -> None:
        pass


def _logged_step(line: str) -> float:
    """The step of one metrics line; a line that cannot be read (e.g. cut by a kill) counts as after every step."""
    try:
        return float(json.loads(line)["VLA Train/Step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def wandb_run_id(run_dir: str | Path) -> str:
    """A stable W&B run id for a run directory (same directory -> same W&B run, so a resumed run continues it)."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def _wandb_key_in_netrc() -> bool:
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode() -> str | None:
    """None (let W&B read an explicit `WANDB_MODE`), "online" when an API key is configured, else "offline"."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY") or _wandb_key_in_netrc():
        return "online"
    logger.warning("No W&B API key (WANDB_API_KEY or netrc): logging to W&B offline; upload later with `wandb sync`.")
    return "offline"


class WandBTracker:
    """One W&B run per run directory: `wandb.init(id=wandb_run_id(run_dir), resume="allow")`."""

    def __init__(self, run_id: str, run_dir: str | Path, hparams: dict, project: str, entity: str | None,
                 group: str = "vla-train") -> None:
        import wandb  # imported here: a jsonl-only run never pays for it

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(name=run_id, dir=str(run_dir), config=hparams, project=project, entity=entity,
                              group=group, id=wandb_run_id(run_dir), resume="allow", mode=wandb_mode())
        # closed-loop results arrive after later training steps were logged: they get their own x-axis
        self.run.define_metric(SIM_STEP_KEY)
        self.run.define_metric(f"{SIM_PREFIX}*", step_metric=SIM_STEP_KEY)
        self._last_step = -1

    def write_hyperparameters(self, hparams: dict) -> None:
        self.run.config.update(hparams, allow_val_change=True)

    def write(self, global_step: int, metrics: dict[str, float]) -> None:
        """W&B drops a step lower than one already logged: metrics of an earlier step (closed-loop evaluation
        results, which carry their step as `Sim/Step`) are logged at the latest step."""
        self._last_step = max(self._last_step, global_step)
        self.run.log(metrics, step=self._last_step)

    def finalize(self) -> None:
        self.run.finish()


def make_trackers(names: Sequence[str], run_id: str, run_dir: str | Path, hparams: dict, project: str = "openvla",
                  entity: str | None = None, is_main: bool | None = None,
                  start_step: int | None = None) -> list[Tracker]:
    """Trackers by name (`jsonl`, `wandb`), hyperparameters written; `[]` on every rank but 0 (`is_main` defaults to
    the process group's rank). Names are validated on every rank. `start_step`: see `JSONLinesTracker`."""
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"Unknown tracker(s) {unknown}; choose from {list(TRACKERS)}.")
    if not (is_rank_zero() if is_main is None else is_main):
        return []
    trackers: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name == "jsonl":
            trackers.append(JSONLinesTracker(run_id, run_dir, start_step))
        else:
            trackers.append(WandBTracker(run_id, run_dir, hparams, project, entity))
        trackers[-1].write_hyperparameters(hparams)
    return trackers
