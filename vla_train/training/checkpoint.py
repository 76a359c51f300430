"""Complete, resumable training checkpoints for FSDP2-sharded models, plus the reference's consolidated `.pt` files.

One save writes, under `run_dir/checkpoints/` (facts §1.4, §4.7, §9.4; fixes §12 items 1, 2, 3, 6):

- `step-XXXXXX-epoch-XX-loss=X.XXXX/`: a sharded `torch.distributed.checkpoint` of the model and optimizer (DTensor
  shards, no gather), the LR scheduler and the train state (step, epoch, loss, whatever the caller adds), plus one
  `rank-XXXXX.pt` per rank (data-pipeline position, RNG states, rank and world size). It is written as a hidden
  temporary sibling and renamed by rank 0 once every rank finished; `complete.json` is written last, so a directory
  with the final name is always complete and discovery ignores everything else.
- `step-XXXXXX-epoch-XX-loss=X.XXXX.pt`: `{"model": {"vision_backbone", "projector", "llm_backbone"}}` in FP32 full
  tensors, loadable by `vla_train.models.run_dir.load_run_dir` and by reference tooling (optional:
  `save_consolidated=False` skips the rank-0 gather of the full model).
- `latest-checkpoint.pt`: atomically re-pointed (hard link, else copy) at that file; the reference never wrote it.

Exact resume needs the DCP directory; a `.pt` alone can initialize fine-tuning but not resume.
"""

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

from vla_train.log import logger
from vla_train.models.run_dir import CHECKPOINT_SUBDIR, LATEST_CHECKPOINT, atomic_torch_save
from vla_train.training.checkpoint_io import (
    COMPLETE_MARKER,
    FORMAT_VERSION,
    TMP_CONSOLIDATED,
    atomic_link_or_copy,
    atomic_write_text,
    capture_rng_state,
    checkpoint_name,
    consolidated_path,
    file_sizes,
    from_blob,
    is_complete,
    parse_checkpoint_name,
    rank_file_name,
    read_marker,
    remove_checkpoint_dir,
    remove_stale_temporaries,
    restore_rng_state,
    split_module_state,
    to_blob,
)
from vla_train.training.distributed import barrier, broadcast_object, run_on_every_rank


def _rank_and_world_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _dcp(fn: Any, state: dict[str, Any], path: Path) -> None:
    """`dcp.save` / `dcp.load`; without a process group, a single-process call without DCP's warning about it."""
    if dist.is_initialized():
        fn(state, checkpoint_id=path)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=path, no_dist=True)


def _drop_unsaved_optimizer_state(optim_state: dict[str, Any], path: Path) -> None:
    """Forget the template state of parameters that had none when saved (never given a gradient, e.g. the unused
    last ViT block): `get_state_dict` initializes every parameter's state on a fresh optimizer, DCP would then
    report it missing, and the saved optimizer had none. Partially missing states still fail in DCP."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for fqn, param_state in list(optim_state["state"].items()):
        if not any(f"optimizer.state.{fqn}.{name}" in saved for name in param_state):
            del optim_state["state"][fqn]


def _state_dicts_to_save(model: nn.Module, optimizer: Optimizer | None) -> tuple[dict, dict | None]:
    """Sharded (DTensor) model and optimizer state dicts keyed by parameter FQN; collective.

    `get_state_dict` gives a not yet stepped optimizer a state (a zero-lr step); that state is dropped again, so
    that saving before the first step does not shift AdamW's step count.
    """
    if optimizer is None:
        return get_model_state_dict(model), None
    had_state = bool(optimizer.state)
    model_state, optim_state = get_state_dict(model, optimizer)
    if not had_state:
        optimizer.state.clear()
        optim_state["state"] = {}
    return model_state, optim_state


class CorruptCheckpointError(ValueError):
    """A complete checkpoint whose files no longer match what was written (truncated, damaged or deleted)."""


class CheckpointManager:
    """Save, discover, prune and restore checkpoints of one run directory.

    `keep_last_k`: after each successful save, rank 0 deletes all but the newest k complete checkpoints (DCP
    directory and its `.pt`); None keeps everything.
    """

    def __init__(self, run_dir: str | Path, keep_last_k: int | None = None, *, save_consolidated: bool = True) -> None:
        if keep_last_k is not None and keep_last_k < 1:
            raise ValueError(f"keep_last_k must be None (keep all) or >= 1, got {keep_last_k}.")
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_SUBDIR
        self.keep_last_k = keep_last_k
        self.save_consolidated = save_consolidated

    # ---------------------------------------------------------------------------------------------------- saving
    def save(self, step: int, epoch: int, loss: float | None, *, model: nn.Module, optimizer: Optimizer | None,
             scheduler: Any | None, data_state: dict[str, Any], train_state: dict[str, Any]) -> Path:
        """Write a complete checkpoint; returns its DCP directory. Collective: call on every rank.

        Rank 0's `loss` names the checkpoint and rank 0's `train_state` and scheduler state are stored (the ranks'
        local losses differ); per-rank state goes in `data_state`. Order: shards and the consolidated `.pt` into a
        temporary directory, the completion marker (with every file's size), the `.pt` moved into place, then the
        directory renamed: a committed checkpoint always has its `.pt`. A failure on any rank removes the temporary
        directory on rank 0 and raises on every rank.
        """
        rank, world_size = _rank_and_world_size()
        loss = None if loss is None else float(loss)
        for key, value in (("step", step), ("epoch", epoch)):
            if key in train_state and train_state[key] != value:
                raise ValueError(f"train_state[{key!r}]={train_state[key]!r} contradicts {key}={value}.")
        shared = {"scheduler": to_blob(scheduler.state_dict() if scheduler is not None else None),
                  "train_state": to_blob({**train_state, "step": step, "epoch": epoch, "loss": loss}),
                  "step": step, "epoch": epoch, "loss": loss}
        shared = broadcast_object(shared)  # rank 0's loss names the checkpoint
        step, epoch, loss = shared.pop("step"), shared.pop("epoch"), shared.pop("loss")
        name = checkpoint_name(step, epoch, loss)
        final, tmp = self.checkpoint_dir / name, self.checkpoint_dir / f".{name}.tmp"
        marker = {"version": FORMAT_VERSION, "name": name, "step": step, "epoch": epoch, "loss": loss,
                  "world_size": world_size, "has_optimizer": optimizer is not None}
        steps = [("preparing", lambda: self._make_temporary(tmp) if rank == 0 else None),
                 ("writing", lambda: self._write_shards(tmp, model, optimizer, shared, data_state)),
                 ("consolidating", lambda: self._save_consolidated(model, tmp, rank) if self.save_consolidated
                  else None),
                 ("committing", lambda: self._commit(tmp, final, {**marker, "saved_at": time.time()}) if rank == 0
                  else None)]
        try:
            for what, work in steps:
                run_on_every_rank(work, f"{what} checkpoint {name} (nothing was committed)")
        except BaseException:
            if rank == 0:
                remove_checkpoint_dir(tmp)
            raise
        if rank == 0:
            remove_stale_temporaries(self.checkpoint_dir)
            self._prune(keep=final)
        barrier()
        logger.info("Saved checkpoint %s (%d rank files)", final, world_size)
        return final

    @staticmethod
    def _make_temporary(tmp: Path) -> None:
        remove_checkpoint_dir(tmp)
        tmp.mkdir(parents=True)

    @staticmethod
    def _write_shards(tmp: Path, model: nn.Module, optimizer: Optimizer | None, shared: dict[str, bytes],
                      data_state: dict[str, Any]) -> None:
        """Every rank: its DCP shards (model, optimizer; one copy of `shared`), then its own rank file."""
        rank, world_size = _rank_and_world_size()
        model_state, optim_state = _state_dicts_to_save(model, optimizer)
        state = {"model": model_state, **shared}
        if optim_state is not None:
            state["optimizer"] = optim_state
        _dcp(dcp.save, state, tmp)
        rank_state = {"version": FORMAT_VERSION, "rank": rank, "world_size": world_size, "data_state": data_state,
                      "rng": capture_rng_state()}
        atomic_torch_save(rank_state, tmp / rank_file_name(rank))

    @staticmethod
    def _commit(tmp: Path, final: Path, marker: dict[str, Any]) -> None:
        """Rank 0: the marker (every file's size) last into `tmp`, the `.pt` and `latest` into place, then rename."""
        consolidated = tmp / TMP_CONSOLIDATED
        marker = {**marker, "files": file_sizes(tmp, exclude=(TMP_CONSOLIDATED,)),
                  "consolidated_size": consolidated.stat().st_size if consolidated.is_file() else None}
        atomic_write_text(tmp / COMPLETE_MARKER, json.dumps(marker, indent=2))
        if consolidated.is_file():
            os.replace(consolidated, consolidated_path(final))
        if final.exists():  # the same step saved again (e.g. a re-run): replace it
            old = final.with_name(f".{final.name}.old")
            remove_checkpoint_dir(old)
            final.rename(old)
            tmp.rename(final)
            remove_checkpoint_dir(old)
        else:
            tmp.rename(final)
        if marker["consolidated_size"] is not None:
            atomic_link_or_copy(consolidated_path(final), final.parent / LATEST_CHECKPOINT)

    @staticmethod
    def _save_consolidated(model: nn.Module, tmp: Path, rank: int) -> None:
        """Gather FP32 full tensors to rank 0's CPU (collective) and write the reference `.pt` into `tmp`."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full_state = get_model_state_dict(model, options=options)  # empty on ranks other than 0
        if rank == 0:
            atomic_torch_save({"model": split_module_state(full_state)}, tmp / TMP_CONSOLIDATED)
        del full_state

    def _prune(self, keep: Path) -> None:
        if self.keep_last_k is None:
            return
        for old in self.complete_checkpoints()[: -self.keep_last_k]:
            if old == keep:
                continue
            logger.info("Deleting checkpoint %s (keep_last_k=%d)", old, self.keep_last_k)
            remove_checkpoint_dir(old)
            consolidated_path(old).unlink(missing_ok=True)

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
        """The complete DCP directory for a DCP directory, a `step-....pt` or a `latest-checkpoint.pt` path."""
        path = Path(checkpoint)
        if path.is_dir():
            read_marker(path)  # raises for an incomplete directory
            return path
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

    # --------------------------------------------------------------------------------------------------- loading
    def load(self, path: str | Path, *, model: nn.Module, optimizer: Optimizer | None,
             scheduler: Any | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore model/optimizer/scheduler in place and this rank's RNG states; returns (train_state, data_state).

        `path`: a DCP directory (or its `.pt`, see `find_path`). Collective: call on every rank, with the model
        already sharded (any FSDP layout over the same world size) and the optimizer built on it.
        """
        path = self.find_path(path)
        rank, world_size = _rank_and_world_size()
        marker = read_marker(path)
        if marker["world_size"] != world_size:
            raise ValueError(f"{path} was saved by {marker['world_size']} ranks, this run has {world_size}: the data "
                             "positions and RNG states are per rank. Resume with the same world size.")
        if optimizer is not None and not marker.get("has_optimizer", True):
            raise ValueError(f"{path} was saved without optimizer state; load it with optimizer=None.")
        rank_state = torch.load(path / rank_file_name(rank), map_location="cpu", weights_only=False)
        if (rank_state["rank"], rank_state["world_size"]) != (rank, world_size):
            raise ValueError(f"{path / rank_file_name(rank)} belongs to rank {rank_state['rank']} of "
                             f"{rank_state['world_size']}, not rank {rank} of {world_size}.")

        state: dict[str, Any] = {"scheduler": b"", "train_state": b""}
        if optimizer is None:
            state["model"] = get_model_state_dict(model)
        else:  # templates: get_state_dict gives the fresh optimizer a state for every parameter
            state["model"], optim_state = get_state_dict(model, optimizer)
            _drop_unsaved_optimizer_state(optim_state, path)
            state["optimizer"] = optim_state
        _dcp(dcp.load, state, path)
        set_model_state_dict(model, state["model"])
        if optimizer is not None:  # not strict: parameters dropped above had no state when saved (DCP checked the rest)
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
        scheduler_state = from_blob(state["scheduler"])
        if scheduler is not None:
            if scheduler_state is None:
                raise ValueError(f"{path} holds no scheduler state; load it with scheduler=None.")
            scheduler.load_state_dict(scheduler_state)
        restore_rng_state(rank_state["rng"])
        logger.info("Loaded checkpoint %s (step %s, epoch %s)", path, marker["step"], marker["epoch"])
        return from_blob(state["train_state"]), rank_state["data_state"]

