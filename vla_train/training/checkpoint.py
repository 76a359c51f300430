"""Complete, resumable training checkpoints for FSDP2-sharded models, saved asynchronously, plus the reference's
consolidated `.pt` files when asked.

One save writes, under `run_dir/checkpoints/` (facts §1.4, §4.7, §9.4; fixes §12 items 1, 2, 3, 6):

- `step-XXXXXX-epoch-XX-loss=X.XXXX/`: a sharded `torch.distributed.checkpoint` of a set of Stateful states (see
  `checkpoint_state.py`): model and optimizer as DTensor shards (no gather), every other state (LR scheduler, train
  state) as one blob, plus one `rank-XXXXX.pt` per rank with the per-rank states (data position, RNG states). It is
  written as a hidden temporary sibling and renamed by rank 0 once every rank's write finished; `complete.json` is
  written last, so a directory with the final name is always complete and discovery ignores everything else.
- `step-XXXXXX-epoch-XX-loss=X.XXXX.pt` (optional, `save_consolidated`): `{"model": {"vision_backbone", "projector",
  "llm_backbone"}}` in FP32 full tensors (a rank-0 gather), loadable by `vla_train.models.run_dir.load_run_dir` and by
  reference tooling; with an EMA (`states["ema"]`, `--vla.ema_decay`) its weights are written as the trainable
  weights (what openpi exports; the trained weights stay in the sharded checkpoint). `latest-checkpoint.pt` is
  atomically re-pointed (hard link, else copy) at the newest one. A checkpoint without it is consolidated offline on
  demand (`checkpoint_io.consolidate_checkpoint`, e.g. by export; it lays the EMA over the trainable weights too).

Async saves (`async_save=True`): the state is staged to CPU memory (a copy: training continues and mutates the model)
and the rank files are written before `save` returns; the shards are written by a background thread over a dedicated
gloo group. At most one save is in flight: the next `save` (or `wait`) first waits for it, agrees with every rank that
every write succeeded, then commits it (marker, rename, `.pt`, `latest`, pruning) — or raises on every rank, naming
the checkpoint, and removes its temporary directory. A kill during a background write leaves only a hidden
temporary directory: the previous complete checkpoint is never touched.
"""

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from vla_train.atomic_io import atomic_torch_save, atomic_write_text
from vla_train.config.train import SAVE_CONSOLIDATED
from vla_train.log import logger
from vla_train.models.lora import merge_lora_state
from vla_train.models.run_dir import LATEST_CHECKPOINT
from vla_train.training.checkpoint_discovery import CheckpointDiscovery, CorruptCheckpointError
from vla_train.training.checkpoint_io import (
    COMPLETE_MARKER,
    FORMAT_VERSION,
    TMP_CONSOLIDATED,
    atomic_link_or_copy,
    checkpoint_name,
    consolidated_path,
    file_sizes,
    from_blob,
    rank_file_name,
    rank_states,
    read_marker,
    remove_checkpoint_dir,
    remove_stale_temporaries,
    split_module_state,
    to_blob,
)
from vla_train.training.checkpoint_state import (
    EMA,
    MODEL,
    OPTIMIZER,
    TRAIN_STATE,
    ModelState,
    check_option_states,
    is_sharded,
)
from vla_train.training.distributed import barrier, broadcast_object, run_on_every_rank

__all__ = ["CheckpointManager", "CheckpointWriteError", "CorruptCheckpointError"]


def _rank_and_world_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _dcp(fn: Any, state: dict[str, Any], path: Path, **kwargs: Any) -> Any:
    """`dcp.save` / `dcp.async_save` / `dcp.load`; without a process group, a single-process call without DCP's
    warning about it."""
    if dist.is_initialized():
        return fn(state, checkpoint_id=path, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(state, checkpoint_id=path, no_dist=True)


def _last_line(error: BaseException) -> str:
    """The gist of an error: DCP's CheckpointException holds every failed rank's traceback."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


class CheckpointWriteError(RuntimeError):
    """A checkpoint's (background) write failed; nothing was committed."""


ConsolidatedFiles = Callable[[dict[str, torch.Tensor], Path, int], Any]


@dataclass
class _Save:
    """A save between its start and its commit."""

    name: str
    tmp: Path
    final: Path
    marker: dict[str, Any]
    started: float
    future: Future | None = None
    written_at: list[float] = field(default_factory=list)  # set by the background thread when its write ends


class CheckpointManager(CheckpointDiscovery):
    """Save, discover, prune and restore checkpoints of one run directory.

    `keep_last_k`: after each commit, rank 0 deletes all but the newest k complete checkpoints (DCP directory and
    its `.pt`); None keeps everything. `save_consolidated`: when to write the FP32 `.pt` — "every" save, only at the
    "end" (saves with `final=True`), or "never". `async_save`: write the shards in the background (see above);
    `final` saves are always synchronous. `model_id` is recorded in the marker (checked before a resume builds).
    `consolidated_files(full_state, directory, step)`: rank 0, on consolidated saves, with the gathered (unmerged)
    model state: writes a policy family's own files into the checkpoint directory before it commits (OFT's).
    """

    def __init__(self, run_dir: str | Path, keep_last_k: int | None = None, *, save_consolidated: str = "every",
                 async_save: bool = False, model_id: str | None = None,
                 consolidated_files: ConsolidatedFiles | None = None) -> None:
        super().__init__(run_dir)
        if keep_last_k is not None and keep_last_k < 1:
            raise ValueError(f"keep_last_k must be None (keep all) or >= 1, got {keep_last_k}.")
        if save_consolidated not in SAVE_CONSOLIDATED:
            raise ValueError(f"save_consolidated = {save_consolidated!r}; expected one of {list(SAVE_CONSOLIDATED)}.")
        self.keep_last_k = keep_last_k
        self.save_consolidated = save_consolidated
        self.async_save = async_save
        self.model_id = model_id
        self.consolidated_files = consolidated_files
        self.last_save_s: float | None = None  # the last save's duration, background write included once known
        self._pending: _Save | None = None
        self._group: dist.ProcessGroup | None = None

    # ---------------------------------------------------------------------------------------------------- saving
    def save(self, step: int, epoch: int, loss: float | None, states: Mapping[str, Stateful],
             per_rank_states: Mapping[str, Stateful] | None = None, *, final: bool = False,
             consolidate: bool | None = None) -> Path:
        """Save `states` (one copy: rank 0's, or sharded tensors) and this rank's `per_rank_states`; returns the
        checkpoint's directory, committed on return unless the save runs in the background. Collective.

        Rank 0's `loss` names the checkpoint. `states[TRAIN_STATE]` (optional) is stored with `step`, `epoch` and
        `loss` added. `final`: the run's last save (synchronous; consolidated unless `save_consolidated` is
        "never"); `consolidate` overrides the mode for this save. Raises, on every rank, the failure of the previous
        background save before starting this one."""
        self.wait()
        rank, world_size = _rank_and_world_size()
        started = time.monotonic()
        header = broadcast_object({"step": step, "epoch": epoch, "loss": None if loss is None else float(loss)})
        name = checkpoint_name(header["step"], header["epoch"], header["loss"])
        final_dir = self.checkpoint_dir / name
        marker = {"version": FORMAT_VERSION, "name": name, **header, "world_size": world_size,
                  "has_optimizer": OPTIMIZER in states, "states": sorted(states),
                  "per_rank_states": sorted(per_rank_states or {}), "model_id": self.model_id}
        save = _Save(name, self.checkpoint_dir / f".{name}.tmp", final_dir, marker, started)
        if consolidate is None:
            consolidate = self.save_consolidated == "every" or (self.save_consolidated == "end" and final)
        background = self.async_save and not final
        if background and dist.is_initialized() and self._group is None:
            self._group = dist.new_group(backend="gloo")  # the background thread's collectives: never the training's
        steps = [("preparing", lambda: self._make_temporary(save.tmp) if rank == 0 else None),
                 ("consolidating", lambda: self._save_consolidated(states, save.tmp, rank, header["step"])
                  if consolidate else None),
                 ("writing", lambda: self._write_rank_file(save.tmp, per_rank_states or {})),
                 ("reading the states of", lambda: self._blobs(states, header) if rank == 0 else None)]
        try:
            for what, work in steps:
                blobs = run_on_every_rank(work, f"{what} checkpoint {name} (nothing was committed)")
            blobs = broadcast_object(blobs)  # rank 0's scheduler and train state
            run_on_every_rank(lambda: self._write_shards(save, states, blobs, background),
                              f"writing checkpoint {name} (nothing was committed)")
        except BaseException:
            if rank == 0:
                remove_checkpoint_dir(save.tmp)
            raise
        self._pending = save
        if background:
            self.last_save_s = max(self.last_save_s or 0.0, time.monotonic() - started)
            logger.info("Checkpoint %s: state staged in %.1f s, writing in the background", name,
                        time.monotonic() - started)
            return final_dir
        self.wait()
        return final_dir

    @property
    def in_flight(self) -> str | None:
        """The name of the save not yet committed (written in the background), or None."""
        return None if self._pending is None else self._pending.name

    def wait(self) -> Path | None:
        """Wait for the save in flight (if any) on every rank, then commit it; collective. Raises on every rank
        when any rank's write failed (the temporary directory is removed). Returns the committed directory."""
        save, self._pending = self._pending, None
        if save is None:
            return None
        rank, world_size = _rank_and_world_size()
        try:
            run_on_every_rank(lambda: self._result(save), f"writing checkpoint {save.name} (nothing was committed)")
            marker = {**save.marker, "saved_at": time.time()}
            run_on_every_rank(lambda: self._commit(save.tmp, save.final, marker) if rank == 0 else None,
                              f"committing checkpoint {save.name} (nothing was committed)")
        except BaseException:
            if rank == 0:
                remove_checkpoint_dir(save.tmp)
            raise
        if rank == 0:
            remove_stale_temporaries(self.checkpoint_dir)
            self._prune(keep=save.final)
        barrier()
        self.last_save_s = (save.written_at[0] if save.written_at else time.monotonic()) - save.started
        logger.info("Saved checkpoint %s (%d rank files, %.1f s)", save.final, world_size, self.last_save_s)
        return save.final

    def close(self) -> None:
        """Not collective (for error paths): wait for this rank's background write, if any, without committing it
        (its temporary directory is removed by the next save); a failure is logged."""
        save, self._pending = self._pending, None
        if save is not None and save.future is not None:
            try:
                save.future.result()
            except (Exception, CheckpointException) as error:  # logged: the run is already failing
                logger.error("The background write of checkpoint %s failed: %s", save.name, error)
            logger.warning("Checkpoint %s was not committed (the run stopped before every rank agreed).", save.name)

    @staticmethod
    def _result(save: _Save) -> None:
        if save.future is None:
            return
        try:
            save.future.result()
        except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
            raise CheckpointWriteError(
                f"Writing checkpoint {save.name} in the background failed ({_last_line(error)}); nothing was "
                "committed, the previous checkpoint is intact.") from error

    @staticmethod
    def _make_temporary(tmp: Path) -> None:
        remove_checkpoint_dir(tmp)
        tmp.mkdir(parents=True)

    @staticmethod
    def _write_rank_file(tmp: Path, per_rank_states: Mapping[str, Stateful]) -> None:
        """This rank's states, read now (the save step's), into `rank-XXXXX.pt`."""
        rank, world_size = _rank_and_world_size()
        rank_state = {"version": FORMAT_VERSION, "rank": rank, "world_size": world_size,
                      "states": {key: state.state_dict() for key, state in per_rank_states.items()}}
        atomic_torch_save(rank_state, tmp / rank_file_name(rank))

    @staticmethod
    def _blobs(states: Mapping[str, Stateful], header: dict[str, Any]) -> dict[str, bytes]:
        """Rank 0: every state that is not sharded as one opaque blob (the train state with step, epoch, loss)."""
        values = {key: state.state_dict() for key, state in states.items() if not is_sharded(state)}
        values[TRAIN_STATE] = {**values.get(TRAIN_STATE, {}), **header}
        return {key: to_blob(value) for key, value in values.items()}

    def _write_shards(self, save: _Save, states: Mapping[str, Stateful], blobs: dict[str, bytes],
                      background: bool) -> None:
        """Every rank: its DCP shards of the sharded states, and one copy of the blobs. In the background: the
        state is staged (copied to CPU memory) before this returns, the write runs in a thread."""
        state_dict: dict[str, Any] = {key: state.state_dict() for key, state in states.items() if is_sharded(state)}
        state_dict.update(blobs)
        if not background:
            try:
                _dcp(dcp.save, state_dict, save.tmp)
            except CheckpointException as error:  # a BaseException: make it one `run_on_every_rank` agrees on
                raise CheckpointWriteError(f"Writing checkpoint {save.name} failed ({_last_line(error)}).") from error
            return
        kwargs = {"process_group": self._group} if dist.is_initialized() else {}
        future = _dcp(dcp.async_save, state_dict, save.tmp, **kwargs)
        save.future = getattr(future, "upload_completion", future)  # an AsyncSaveResponse with async staging
        save.future.add_done_callback(lambda _: save.written_at.append(time.monotonic()))

    @staticmethod
    def _commit(tmp: Path, final: Path, marker: dict[str, Any]) -> None:
        """Rank 0: the marker (every file's size) last into `tmp`, the `.pt` and `latest` into place, then rename."""
        consolidated = tmp / TMP_CONSOLIDATED
        marker = {**marker, "files": file_sizes(tmp, exclude=(TMP_CONSOLIDATED,)),
                  "consolidated_size": consolidated.stat().st_size if consolidated.is_file() else None}
        atomic_write_text(tmp / COMPLETE_MARKER, json.dumps(marker, indent=2))
        if consolidated.is_file():
            os.replace(consolidated, consolidated_path(final))
        else:  # a `.pt` of an earlier save of the same step would not match this checkpoint
            consolidated_path(final).unlink(missing_ok=True)
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

    def _save_consolidated(self, states: Mapping[str, Stateful], tmp: Path, rank: int, step: int) -> None:
        """Gather FP32 full tensors to rank 0's CPU (collective) and write the reference `.pt` (and the
        `consolidated_files`) into `tmp`. With `states["ema"]` the EMA weights replace the trainable weights in both
        (the consolidated model is the averaged one)."""
        model_state = states.get(MODEL)
        if not isinstance(model_state, ModelState):
            raise ValueError(f"A consolidated checkpoint needs states[{MODEL!r}] to be a ModelState.")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full_state = get_model_state_dict(model_state.model, options=options)  # empty on ranks other than 0
        ema = states.get(EMA)
        if ema is not None:  # collective
            full_state = ema.in_full_state(full_state)
            logger.info("Consolidated checkpoint of step %d: the EMA weights (decay %g) are written as the model's "
                        "trainable weights", step, ema.decay)
        if rank == 0:
            if self.consolidated_files is not None:
                self.consolidated_files(full_state, tmp, step)
            lora = getattr(model_state.model, "lora", None)  # the merged weights: any loader reads them without peft
            if lora is not None:
                full_state = merge_lora_state(full_state, lora.scaling)
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

    # --------------------------------------------------------------------------------------------------- loading
    def load(self, path: str | Path, states: Mapping[str, Stateful],
             per_rank_states: Mapping[str, Stateful] | None = None) -> dict[str, Any]:
        """Restore `states` and this rank's `per_rank_states` in place; returns the train state (step, epoch, loss
        and what `states[TRAIN_STATE]` held). Collective: call on every rank, with the model already sharded (any
        FSDP layout over the same world size) and the optimizer built on it.

        `path`: a DCP directory (or its `.pt`, see `find_path`); format 2 and 3 checkpoints load."""
        path = self.find_path(path)
        rank, world_size = _rank_and_world_size()
        marker = read_marker(path)
        if marker["world_size"] != world_size:
            raise ValueError(f"{path} was saved by {marker['world_size']} ranks, this run has {world_size}: the data "
                             "positions and RNG states are per rank. Resume with the same world size.")
        if OPTIMIZER in states and not marker.get("has_optimizer", True):
            raise ValueError(f"{path} was saved without optimizer state; load it without an optimizer state.")
        saved_keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        check_option_states(path, states, saved_keys)
        rank_file = torch.load(path / rank_file_name(rank), map_location="cpu", weights_only=False)
        if (rank_file["rank"], rank_file["world_size"]) != (rank, world_size):
            raise ValueError(f"{path / rank_file_name(rank)} belongs to rank {rank_file['rank']} of "
                             f"{rank_file['world_size']}, not rank {rank} of {world_size}.")
        saved_rank_states = rank_states(rank_file)
        missing = [key for key in (per_rank_states or {}) if key not in saved_rank_states]
        missing += [key for key in states if not any(k == key or k.startswith(f"{key}.") for k in saved_keys)]
        if missing:
            saved = marker.get("states", "model, optimizer, scheduler, train_state")
            raise ValueError(f"{path} holds no {missing} state (it has {sorted(saved_rank_states)} per rank and "
                             f"{saved}); load it without them.")

        template: dict[str, Any] = {TRAIN_STATE: b""}
        for key, state in states.items():
            template[key] = (state.load_template(path) if hasattr(state, "load_template") else state.state_dict()) \
                if is_sharded(state) else b""
        _dcp(dcp.load, template, path)
        for key, state in states.items():
            state.load_state_dict(template[key] if is_sharded(state) else from_blob(template[key]))
        for key, state in (per_rank_states or {}).items():
            state.load_state_dict(saved_rank_states[key])
        logger.info("Loaded checkpoint %s (step %s, epoch %s)", path, marker["step"], marker["epoch"])
        return from_blob(template[TRAIN_STATE])
