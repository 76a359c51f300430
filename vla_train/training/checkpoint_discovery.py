"""Discovery and verification of a run's checkpoints (`CheckpointManager`'s read-only half).

A checkpoint is a complete DCP directory `step-XXXXXX-epoch-XX-loss=X.XXXX/` (its `complete.json` marker written
last); its consolidated `step-....pt` next to it is optional (see `TrainConfig.save_consolidated`).
"""

from pathlib import Path

from vla_train.log import logger
from vla_train.models.run_dir import CHECKPOINT_SUBDIR, LATEST_CHECKPOINT
from vla_train.training.checkpoint_io import (
    COMPLETE_MARKER,
    consolidated_path,
    is_complete,
    parse_checkpoint_name,
    read_marker,
)


class CorruptCheckpointError(ValueError):
    """A complete checkpoint whose files no longer match what was written (truncated, damaged or deleted)."""


class CheckpointDiscovery:
    """Find, list and verify the complete checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_SUBDIR

    # ------------------------------------------------------------------------------------------------- discovery
    def complete_checkpoints(self) -> list[Path]:
        """Complete DCP checkpoint directories, oldest first (by step, epoch, then save time)."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = []
        for path in self.checkpoint_dir.iterdir():
            parsed = parse_checkpoint_name(path.name)
            if parsed is not None and not path.name.endswith(".pt") and is_complete(path):
                found.append((*parsed, (path / COMPLETE_MARKER).stat().st_mtime, path))
        return [entry[-1] for entry in sorted(found)]

    def latest_complete(self) -> Path | None:
        """The newest complete DCP checkpoint directory (temporary and incomplete ones are ignored), or None."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def latest_verified(self) -> Path | None:
        """The newest complete checkpoint whose files all have their recorded sizes; a newer damaged one (e.g. a
        truncated shard) is skipped with a warning that names the bad file."""
        for path in reversed(self.complete_checkpoints()):
            try:
                self.verify(path)
            except CorruptCheckpointError as error:
                logger.warning("Skipping a damaged checkpoint: %s Falling back to the previous one.", error)
                continue
            return path
        return None

    @staticmethod
    def verify(path: Path) -> None:
        """Raise `CorruptCheckpointError` naming the first file (shard, rank file or `.pt`) that is missing or whose
        size differs from the completion marker's record; markers of format 1 recorded no sizes and pass."""
        marker = read_marker(path)
        expected = {path / name: size for name, size in marker.get("files", {}).items()}
        if marker.get("consolidated_size") is not None:
            expected[consolidated_path(path)] = marker["consolidated_size"]
        for file, size in expected.items():
            actual = file.stat().st_size if file.is_file() else None
            if actual != size:
                found = "is missing" if actual is None else f"has {actual} bytes"
                raise CorruptCheckpointError(f"{file} {found}, but {size} bytes were written when {path.name} was "
                                             "saved (truncated or damaged).")

    def find(self, step: int | None = None, epoch: int | None = None, *,
             checkpoint: str | Path | None = None) -> Path:
        """The complete DCP directory for `--resume_step/--resume_epoch` and/or a `--pretrained_checkpoint` path.

        `checkpoint` may be a DCP directory, its `step-....pt`, or `latest-checkpoint.pt`; with step/epoch given
        too, they must agree with its name (the reference's three resume flags, checked with a clear error).
        """
        if checkpoint is not None:
            path = self.find_path(checkpoint)
            parsed = parse_checkpoint_name(path.name)
            if parsed is not None and ((step is not None and step != parsed[0]) or
                                       (epoch is not None and epoch != parsed[1])):
                raise ValueError(f"{checkpoint} is step {parsed[0]} epoch {parsed[1]}, but resume step={step} "
                                 f"epoch={epoch} was requested; pass matching values or only the checkpoint.")
            return path
        if step is None:
            raise ValueError("find() needs a step (and optionally an epoch) or a checkpoint path.")
        complete = self.complete_checkpoints()
        matches = [p for p in complete if (parsed := parse_checkpoint_name(p.name)) is not None
                   and parsed[0] == step and (epoch is None or parsed[1] == epoch)]
        if not matches:
            raise FileNotFoundError(
                f"No complete checkpoint for step {step}" + (f" epoch {epoch}" if epoch is not None else "") +
                f" in {self.checkpoint_dir}. Complete checkpoints: {[p.name for p in complete] or 'none'}; "
                f"other entries: {self._other_entries(complete) or 'none'}.")
        if len(matches) > 1:
            logger.warning("Several checkpoints match step %s: %s; using the newest.", step, [p.name for p in matches])
        return matches[-1]

    def _other_entries(self, complete: list[Path]) -> list[str]:
        return sorted(p.name for p in self.checkpoint_dir.iterdir() if p not in complete) \
            if self.checkpoint_dir.is_dir() else []

    @staticmethod
    def find_path(checkpoint: str | Path) -> Path:
        """The complete DCP directory for a DCP directory, a `step-....pt` (which need not exist when its directory
        does: checkpoints saved without a consolidated `.pt`) or a `latest-checkpoint.pt` path."""
        path = Path(checkpoint)
        if path.is_dir():
            read_marker(path)  # raises for an incomplete directory
            return path
        if path.suffix == ".pt" and not path.exists() and is_complete(sibling := path.with_name(path.stem)):
            return sibling  # a checkpoint saved without its consolidated `.pt`
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint {path} does not exist.")
        if path.name == LATEST_CHECKPOINT:
            twins = [p for p in path.parent.glob("step-*.pt") if path.samefile(p)]
            if not twins:
                raise FileNotFoundError(f"{path} is not a link to a step-....pt in {path.parent}; pass that file, or "
                                        "the step and epoch, to resume.")
            path = twins[0]
        if parse_checkpoint_name(path.name) is None or path.suffix != ".pt":
            raise ValueError(f"{path} is not named like a checkpoint (step-XXXXXX-epoch-XX-loss=X.XXXX.pt).")
        directory = path.with_name(path.name.removesuffix(".pt"))
        if not is_complete(directory):
            raise FileNotFoundError(
                f"{path} has no complete sharded checkpoint {directory.name}/ next to it: it holds model weights only "
                "(e.g. a reference checkpoint), so it can initialize fine-tuning but cannot resume training exactly "
                "(optimizer, LR schedule, data position and RNG are missing).")
        return directory
