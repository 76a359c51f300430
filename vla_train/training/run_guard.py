"""Run-directory safety before any work: lock it, refuse to train over an earlier run, check a resume against the run's
saved config and checkpoint, then (after the model and data are built) write the run files.

`prepare_run_dir` is collective: rank 0 takes the lock and decides; every rank gets the same decision (or raises the
same error), so no rank writes, builds or hangs on its own. Nothing in the run directory is written or deleted before
every check passed (the lock file and, for a new run, the empty directory holding it are removed again on failure).
"""

import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla_train.config.model import ModelConfig, model_config_section
from vla_train.config.train import RESUME_AUTO, TrainConfig, load_train_config, write_run_configs
from vla_train.data.statistics import save_dataset_statistics
from vla_train.log import logger
from vla_train.models.run_dir import CHECKPOINT_SUBDIR, find_run_dir, read_model_config
from vla_train.training.checkpoint import CheckpointManager
from vla_train.training.checkpoint_io import consolidate_checkpoint, read_marker, utc_stamp
from vla_train.training.distributed import DistributedContext, broadcast_object
from vla_train.training.run_lock import LOCK_NAME, RunDirectoryError, RunDirLock, acquire_run_lock

# Settings a resume must share with the run it continues: the model, the data stream and the batch layout.
RESUME_INVARIANTS = ("vla.base_vlm", "vla.data_mix", "vla.expected_world_size", "vla.global_batch_size",
                     "vla.per_device_batch_size", "vla.freeze_vision_backbone", "vla.freeze_llm_backbone",
                     "vla.unfreeze_last_llm_layer", "seed", "deterministic_data", "image_aug")
RUN_FILES = ("config.yaml", "config.json", "dataset_statistics.json")


@dataclass
class RunPlan:
    """What `prepare_run_dir` decided: where to resume from (None: a fresh start) and the model to record."""

    run_dir: Path
    resume_from: Path | None
    model_config: dict[str, Any]
    lock: RunDirLock | None = None  # rank 0 only
    created_run_dir: bool = False

    def release(self, failed: bool = False) -> None:
        """Rank 0: drop the lock; after a failure, also the run directory if this run created it and left it empty."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed and self.created_run_dir and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()


def _dotted(cfg: TrainConfig, name: str) -> Any:
    value: Any = cfg
    for part in name.split("."):
        value = getattr(value, part)
    return value


def base_vlm_config(base_vlm: str) -> ModelConfig:
    """The ModelConfig of a `vla.base_vlm`: a run directory (or model-zoo entry), or a registered model id."""
    run_dir = find_run_dir(base_vlm)
    if run_dir is not None:
        return read_model_config(run_dir)
    if base_vlm not in ModelConfig.get_known_choices():
        raise ValueError(f"vla.base_vlm = {base_vlm!r} is neither a run directory nor a registered model id. Fix: "
                         f"pass --vla.base_vlm <run directory> or one of {sorted(ModelConfig.get_known_choices())}.")
    return ModelConfig.get_choice_class(base_vlm)()


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture this run trains: the fine-tuned checkpoint's run, or `vla.base_vlm`. When fine-tuning from a
    checkpoint whose model differs from `vla.base_vlm`, the checkpoint's model is the one recorded (with a warning)."""
    if cfg.pretrained_checkpoint is None or cfg.is_resume:
        return base_vlm_config(cfg.vla.base_vlm)
    model_cfg = read_model_config(Path(cfg.pretrained_checkpoint).parents[1])
    try:
        recipe = model_config_section(base_vlm_config(cfg.vla.base_vlm))
    except (ValueError, FileNotFoundError):
        recipe = None
    if recipe != model_config_section(model_cfg):
        logger.warning("Fine-tuning %s: its model (%s) is not --vla.base_vlm %s; the run records the checkpoint's "
                       "model in config.json, which export and serving read.", cfg.pretrained_checkpoint,
                       model_cfg.model_id, cfg.vla.base_vlm)
    return model_cfg


def _same_base_vlm(saved: str, current: str) -> bool:
    if saved == current:
        return True
    saved_dir, current_dir = find_run_dir(saved), find_run_dir(current)
    return saved_dir is not None and current_dir is not None and saved_dir.resolve() == current_dir.resolve()


def _recorded_model_id(run_dir: Path) -> str | None:
    """The model id a run directory's config.json records, or None when it records none."""
    try:
        return read_model_config(run_dir).model_id
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _model_id(cfg: TrainConfig) -> str | None:
    """The model id this run would build (None when `vla.base_vlm` does not resolve: reported later, by name)."""
    try:
        return resolve_model_config(cfg).model_id
    except (FileNotFoundError, KeyError, ValueError):
        return None


def check_resume_matches(cfg: TrainConfig, saved_run_dir: Path, world_size: int, resume_from: Path | None) -> None:
    """The resumed run's saved config and checkpoint must agree with this one; one error lists every difference."""
    saved = load_train_config(saved_run_dir)
    differences = []
    for name in RESUME_INVARIANTS:
        old, new = _dotted(saved, name), _dotted(cfg, name)
        same = _same_base_vlm(str(old), str(new)) if name == "vla.base_vlm" else old == new
        if not same:
            differences.append(f"{name}: {old!r} in the saved run, {new!r} now")
    if resume_from is not None:
        marker = read_marker(resume_from)
        if marker["world_size"] != world_size:
            differences.append(f"world size: {marker['world_size']} ranks saved {resume_from.name}, {world_size} now")
        saved_model, model = marker.get("model_id") or _recorded_model_id(saved_run_dir), _model_id(cfg)
        if saved_model is not None and model is not None and saved_model != model:
            differences.append(f"model: {saved_model} saved {resume_from.name}, {model} now (--vla.base_vlm "
                               f"{cfg.vla.base_vlm})")
    if differences:
        raise RunDirectoryError(
            f"Cannot resume {saved_run_dir}: this run differs from the saved one in what an exact resume needs:\n  "
            + "\n  ".join(differences) + "\nFix: resume with the saved settings (see "
            f"{saved_run_dir / 'config.yaml'}), or start a new run with another --run_id (fine-tune from its weights "
            "with --pretrained_checkpoint <step-....pt> --is_resume false).")


def prior_work(run_dir: Path) -> list[str]:
    """What an earlier run left in `run_dir` (config files, metrics, checkpoints), excluding the lock."""
    checkpoint_dir = run_dir / CHECKPOINT_SUBDIR
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    found += sorted(p.name for p in run_dir.glob("*.jsonl"))
    if checkpoint_dir.is_dir():
        found += [f"{CHECKPOINT_SUBDIR}/{p.name}" for p in sorted(checkpoint_dir.iterdir())]
    return found


def _clear_run_dir(run_dir: Path) -> None:
    """`--overwrite true`: delete everything in `run_dir` but the lock."""
    for path in run_dir.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_pretrained_checkpoint(checkpoint: Path) -> None:
    """A `--pretrained_checkpoint` must sit in `<run_dir>/checkpoints/` next to `<run_dir>/config.json` and be a
    complete torch zip archive (the central directory at the end of the file is read, not the whole file), or a
    complete sharded checkpoint (its directory, or its `.pt` name when it was saved without one)."""
    config = checkpoint.parents[1] / "config.json" if len(checkpoint.parents) > 1 else None
    if checkpoint.parent.name != CHECKPOINT_SUBDIR or config is None or not config.is_file():
        raise RunDirectoryError(
            f"--pretrained_checkpoint {checkpoint} is not inside a run directory: expected <run_dir>/"
            f"{CHECKPOINT_SUBDIR}/{checkpoint.name} with <run_dir>/config.json describing its model. Fix: pass a "
            "checkpoint of a training or base-VLM run directory, or import a Hugging Face export with "
            "vla-scripts/import_hf.py first.")
    if not checkpoint.is_file():
        try:
            CheckpointManager.find_path(checkpoint)
        except (FileNotFoundError, ValueError) as error:
            raise RunDirectoryError(f"--pretrained_checkpoint {checkpoint}: {error} Fix: pass a complete checkpoint "
                                    "of that run.") from None
        return
    try:
        zipfile.ZipFile(checkpoint).close()
    except (zipfile.BadZipFile, OSError) as error:
        raise RunDirectoryError(f"--pretrained_checkpoint {checkpoint} is not a readable torch checkpoint ({error}): "
                                "it is truncated or corrupt. Fix: pass another checkpoint of that run.") from None


def resolve_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The DCP checkpoint directory to resume from exactly, or None for a fresh start / fine-tuning.

    `--resume auto` takes the newest checkpoint that passes its size check, warning about any newer broken one."""
    if cfg.resume is not None:
        if cfg.resume != RESUME_AUTO:
            path = CheckpointManager.find_path(Path(cfg.resume))
            CheckpointManager.verify(path)
            return path
        latest = CheckpointManager(run_dir).latest_verified()
        logger.info("--resume auto: %s", f"resuming from {latest}" if latest else "no complete checkpoint, fresh start")
        return latest
    if cfg.pretrained_checkpoint is not None and cfg.is_resume:
        checkpoint = Path(cfg.pretrained_checkpoint)
        path = CheckpointManager(checkpoint.parents[1]).find(cfg.resume_step, cfg.resume_epoch)
        CheckpointManager.verify(path)
        return path
    return None


def _decide(cfg: TrainConfig, run_dir: Path, world_size: int) -> tuple[Path | None, dict[str, Any], Path | None]:
    """Rank 0: every check on the run directory, the resume and the model; nothing is written in `run_dir`. Returns
    (checkpoint to resume from, model section, consolidated `.pt` written to fine-tune from or None)."""
    if cfg.pretrained_checkpoint is not None:
        _check_pretrained_checkpoint(Path(cfg.pretrained_checkpoint))
    resume_from = resolve_resume(cfg, run_dir)
    continuing = resume_from is not None or cfg.resume == RESUME_AUTO
    saved_run_dir = resume_from.parents[1] if resume_from is not None else run_dir
    if cfg.overwrite and (cfg.resume is not None or resume_from is not None):
        raise RunDirectoryError("--overwrite true starts the run over; it cannot be combined with a resume. Fix: drop "
                                "--overwrite to continue the run, or drop --resume / --resume_step to start over.")
    if continuing and (saved_run_dir / "config.yaml").is_file():
        check_resume_matches(cfg, saved_run_dir, world_size, resume_from)
    elif not continuing and not cfg.overwrite and (found := prior_work(run_dir)):
        raise RunDirectoryError(
            f"{run_dir} already holds an earlier run ({', '.join(found[:6])}{' ...' if len(found) > 6 else ''}); "
            "a fresh run would mix with it and --keep_last_k would delete its checkpoints. Fix: pass --resume auto to "
            "continue it, --run_id <new id> (or --run_id_note) to start a new run beside it, or --overwrite true to "
            "delete it and start over.")
    model = model_config_section(resolve_model_config(cfg))
    weights = None
    if cfg.pretrained_checkpoint is not None and not cfg.is_resume and not Path(cfg.pretrained_checkpoint).is_file():
        # fine-tuning from a checkpoint saved without its `.pt`: consolidate it next to it (offline, rank 0)
        weights = consolidate_checkpoint(CheckpointManager.find_path(Path(cfg.pretrained_checkpoint)))
    return resume_from, model, weights


def prepare_run_dir(cfg: TrainConfig, ctx: DistributedContext, run_dir: Path) -> RunPlan:
    """Lock `run_dir` (rank 0), check it, the resume and the model against `cfg`; collective: call on every rank.

    Raises the same `RunDirectoryError` / `ValueError` on every rank when anything is off; with `--overwrite true`
    rank 0 deletes the earlier run (and says so) only after every check passed."""
    plan: RunPlan | None = None
    decision: Any
    if ctx.is_main:
        created = not run_dir.exists()
        try:  # any error is broadcast: the other ranks wait for rank 0's decision
            lock = acquire_run_lock(run_dir)
        except Exception as error:
            decision = error
        else:
            plan = RunPlan(run_dir, None, {}, lock, created)
            try:
                decision = _decide(cfg, run_dir, ctx.world_size)
            except Exception as error:
                decision = error
    decision = broadcast_object(decision if ctx.is_main else None)  # rank 0 decides for all
    if isinstance(decision, BaseException):
        if plan is not None:
            plan.release(failed=True)
        raise decision
    resume_from, model, weights = decision
    if weights is not None:  # every rank reads the consolidated `.pt` rank 0 wrote
        cfg.pretrained_checkpoint = weights
    if plan is None:
        plan = RunPlan(run_dir, resume_from, model)
    plan.resume_from, plan.model_config = resume_from, model
    if ctx.is_main and cfg.overwrite and (found := prior_work(run_dir)):
        logger.warning("--overwrite true: deleting the earlier run in %s (%s).", run_dir, ", ".join(found))
        _clear_run_dir(run_dir)
    return plan


def _backup_if_changed(path: Path, new_text: str, stamp: str) -> None:
    if path.is_file() and path.read_text() != new_text:
        backup = path.with_name(f"{path.stem}.before-{stamp}{path.suffix}")
        path.rename(backup)
        logger.warning("%s changed on resume; the previous version is kept as %s.", path.name, backup.name)


def write_run_files(cfg: TrainConfig, plan: RunPlan, statistics: dict[str, Any]) -> None:
    """Rank 0, after the model and data are built: `config.yaml`, `config.json` (with the trained model's "model"
    section, so export and serving need neither `base_vlm` nor the working directory it was relative to) and
    `dataset_statistics.json`. On a resume, a file whose content changes is kept as `<name>.before-<time>.<ext>`."""
    run_dir = plan.run_dir
    (run_dir / CHECKPOINT_SUBDIR).mkdir(parents=True, exist_ok=True)
    staging = run_dir / f".run-files-{time.time_ns()}"
    staging.mkdir()
    try:
        write_run_configs(cfg, staging, model=plan.model_config)
        save_dataset_statistics(statistics, staging)
        stamp = utc_stamp()
        for name in RUN_FILES:
            _backup_if_changed(run_dir / name, (staging / name).read_text(), stamp)
            (staging / name).replace(run_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
