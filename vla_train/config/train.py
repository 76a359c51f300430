"""TrainConfig: the VLA training entry point's configuration, its run id, validation and `config.yaml`/`config.json`.

Fields and defaults match the reference's `vla-scripts/train.py` (facts §1.2), plus this project's resume, checkpoint
retention, deterministic data and registry options. Unlike the reference, nothing is checked in `__post_init__`
(which also ran on every reload) and no VLA fields are copied onto the config: read them from `cfg.vla`, and call
`validate_train_config(cfg, world_size)` once before any work.

`hf_token` keeps the reference's train.py meaning: a `Path` is a file holding the token, a `str` is the *name of an
environment variable* (a command-line value always parses as `str`). The reference's HF converter instead takes a
`str` as the token itself (facts §12 item 40); here a `str` that looks like a token is rejected, so a token is never
written to `config.yaml`.
"""

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import draccus
import yaml

from vla_train.atomic_io import atomic_write_text
from vla_train.config.sim_eval import SimEvalConfig, validate_sim_eval
from vla_train.config.vla import Exp_DinoSigLIP_224px_OXE_Magic_Soup_Plus, VLAConfig

TRACKERS = ("jsonl", "wandb")
RESUME_AUTO = "auto"
SAVE_CONSOLIDATED = ("end", "every", "never")  # when the FP32 consolidated `.pt` is written
# draccus reads a `str | Path` back as str; this first line of config.yaml records that hf_token was a Path.
HF_TOKEN_PATH_MARK = "# hf_token is a file path"
HF_TOKEN_ENV_MARK = "# hf_token is the name of an environment variable"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")  # the shape of a Hugging Face access token


@dataclass
class TrainConfig:
    """`--vla.type <vla_id>` picks the recipe; every other field is a run option."""

    vla: VLAConfig = field(default_factory=Exp_DinoSigLIP_224px_OXE_Magic_Soup_Plus)  # what to train and how

    data_root_dir: Path = Path("datasets/open-x-embodiment")  # RLDS datasets: <data_root_dir>/<name>/<version>/
    run_root_dir: Path = Path("runs")  # run directories are <run_root_dir>/<run_id>/

    pretrained_checkpoint: Path | None = None  # a `.pt` VLA checkpoint to start from (weights only)
    is_resume: bool = True  # with pretrained_checkpoint: continue its step/epoch counters (reference default True)
    resume_step: int | None = None  # with is_resume: the checkpoint's step (must match its file name)
    resume_epoch: int | None = None  # with is_resume: the checkpoint's epoch (must match its file name)

    run_id: str | None = None  # run directory name; default f"{vla_id}+n{ews // 8}+b{pdbs}+x{seed}"
    run_id_note: str | None = None  # appended to the run id as "--{note}"
    save_interval: int = 2500  # gradient steps between checkpoints
    image_aug: bool = False  # train-time image augmentation (appends "--image_aug" to the run id)
    seed: int = 7  # global seed (python, numpy, torch, data pipeline)

    hf_token: str | Path = Path(".hf_token")  # Path: file with the token; str: name of an environment variable
    trackers: tuple[str, ...] = ("jsonl", "wandb")  # metric sinks, a subset of ("jsonl", "wandb")
    wandb_project: str = "openvla"  # W&B project
    wandb_entity: str = "stanford-voltron"  # W&B entity (user or team)

    resume: str | None = None  # "auto" = newest complete checkpoint of this run's directory, or a checkpoint path
    keep_last_k: int | None = None  # keep only the newest k checkpoints (None: keep all)
    deterministic_data: bool = True  # ordered stream, pure function of (seed, rank, world size): exact resume
    prefetch_batches: int = 2  # batches transformed + collated ahead by a background thread (0: synchronous)
    registry_dirs: tuple[Path, ...] = ()  # extra directories of dataset/mixture YAML (added to rlds_mixtures/)
    log_interval: int = 10  # steps between metric reductions (each one waits for the device) and log lines
    stop_after_steps: int | None = None  # end this invocation after N steps with a checkpoint (time-limited jobs)
    overwrite: bool = False  # a fresh run may delete an earlier run in the same run directory (else it is refused)
    allow_missing_datasets: bool = False  # train on the mixture's datasets present (warns), instead of refusing
    peak_device_tflops: float | None = None  # dense bf16 peak TFLOP/s per device for MFU; None: by device name
    statistics_cache_dir: Path | None = None  # shared directory for statistics caches (default: next to each dataset)
    statistics_timeout_s: float = 21600.0  # how long ranks wait for rank 0's statistics (see compute_statistics.py)
    # After SIGTERM / SIGINT / SIGHUP / SIGUSR1, save only if the last save's duration fits in this many seconds from
    # the signal (torchrun SIGKILLs its workers --shutdown-timeout, default 30 s, after forwarding one); None: always
    signal_save_budget_s: float | None = 25.0
    # Periodic checkpoints: stage the state to CPU memory, write the shards in the background while training goes on
    # (committed once every rank finished; at most one save in flight). The run's last save is always synchronous.
    async_checkpoint: bool = True
    # When to also write the FP32 consolidated `step-....pt` (+ latest-checkpoint.pt, a rank-0 gather of the full
    # model): "end" (the run's last save: end of training or stop_after_steps; not a signal stop), "every" save, or
    # "never". Export, --resume and --pretrained_checkpoint consolidate a checkpoint without one on demand.
    save_consolidated: str = "end"
    # Closed-loop evaluation in MetaWorld every N steps and at the end (None: off): rank 0 evaluates the committed
    # checkpoint in a background process, logged as `Sim/<task> Success` (vla_train/training/closed_loop.py)
    eval_interval: int | None = None
    sim_eval: SimEvalConfig = field(default_factory=SimEvalConfig)  # its tasks, episodes, workers, device, ...


def resolve_run_id(cfg: TrainConfig, world_size: int | None = None) -> str:
    """The reference's run id: `f"{vla_id}+n{ews // 8}+b{pdbs}+x{seed}"` (or `cfg.run_id`), then `--{note}` and
    `--image_aug` suffixes (also on an explicit run id). `world_size`, when given, must equal `expected_world_size`."""
    if world_size is not None:
        cfg.vla.check_world_size(world_size)
    vla = cfg.vla
    run_id = cfg.run_id
    if run_id is None:
        run_id = f"{vla.vla_id}+n{vla.expected_world_size // 8}+b{vla.per_device_batch_size}+x{cfg.seed}"
    if cfg.run_id_note is not None:
        run_id += f"--{cfg.run_id_note}"
    if cfg.image_aug:
        run_id += "--image_aug"
    return run_id


def checkpoint_step_epoch(path: Path) -> tuple[int | None, int | None]:
    """(step, epoch) from a checkpoint file name `step-XXXXXX-epoch-XX-loss=X.XXXX.pt` (None where absent). A link
    such as `latest-checkpoint.pt` (symbolic, or a hard link to a sibling `step-*.pt`) takes its target's name."""
    names = [path.name, path.resolve().name]
    if path.is_file():
        names += sorted(p.name for p in path.parent.glob("step-*.pt") if p != path and p.samefile(path))
    for name in names:
        step, epoch = re.search(r"step-(\d+)-", name), re.search(r"epoch-(\d+)-", name)
        if step or epoch:
            return (int(step[1]) if step else None), (int(epoch[1]) if epoch else None)
    return None, None


def _validate_resume(cfg: TrainConfig) -> None:
    if cfg.resume is not None and cfg.pretrained_checkpoint is not None:
        raise ValueError(
            f"--resume {cfg.resume} and --pretrained_checkpoint {cfg.pretrained_checkpoint} are exclusive. Fix: pass "
            "--resume to continue a run of this project (weights, optimizer, scheduler, data and RNG state), or "
            "--pretrained_checkpoint to start from a checkpoint's weights, not both."
        )
    if cfg.resume is not None and cfg.resume != RESUME_AUTO and not Path(cfg.resume).exists() \
            and not Path(cfg.resume.removesuffix(".pt")).is_dir():  # a `.pt` name of a checkpoint saved without one
        raise ValueError(f"--resume {cfg.resume}: no such checkpoint. Fix: pass an existing checkpoint path, "
                         f"or --resume {RESUME_AUTO} for the newest complete checkpoint of this run's directory.")
    counters = {"resume_step": cfg.resume_step, "resume_epoch": cfg.resume_epoch}
    if cfg.pretrained_checkpoint is None or not cfg.is_resume:
        given = [name for name, value in counters.items() if value is not None]
        if given:
            raise ValueError(f"--{' and --'.join(given)} only apply with --pretrained_checkpoint and --is_resume "
                             "true. Fix: drop them (with --resume the step and epoch come from the checkpoint).")
    if cfg.pretrained_checkpoint is None:
        return
    ckpt = Path(cfg.pretrained_checkpoint)
    sharded = ckpt.with_name(ckpt.stem) if ckpt.suffix == ".pt" else ckpt  # a checkpoint saved without its `.pt`
    if not ckpt.is_file() and not sharded.is_dir():
        raise ValueError(f"--pretrained_checkpoint {ckpt} does not exist. Fix: pass the path of a `.pt` checkpoint or "
                         "of a sharded checkpoint directory, e.g. <run_dir>/checkpoints/step-XXXXXX-epoch-XX-loss=X.XXXX"
                         "(.pt).")
    if not cfg.is_resume:
        return
    missing = [name for name, value in counters.items() if value is None]
    if missing:
        raise ValueError(f"--pretrained_checkpoint {ckpt} with --is_resume true (the default) needs --"
                         f"{' and --'.join(missing)}. Fix: pass them (they must match the file name), or pass "
                         "--is_resume false to fine-tune from it without resuming.")
    step, epoch = checkpoint_step_epoch(ckpt)
    for name, expected, found, pattern in (("resume_step", cfg.resume_step, step, "step-XXXXXX-"),
                                           ("resume_epoch", cfg.resume_epoch, epoch, "epoch-XX-")):
        if found is None:
            raise ValueError(f"--pretrained_checkpoint {ckpt}: the file name has no '{pattern}' to check --{name} "
                             "against. Fix: pass --is_resume false to fine-tune from it without resuming.")
        if found != expected:
            raise ValueError(f"--{name} {expected} does not match the checkpoint file name {ckpt.name} ({found}). "
                             f"Fix: pass --{name} {found}, or --is_resume false to fine-tune from it without "
                             "resuming.")


def validate_train_config(cfg: TrainConfig, world_size: int) -> None:
    """Check the whole configuration for `world_size` processes; a `ValueError` names the bad value and the fix."""
    cfg.vla.validate(world_size)
    if not 0 < cfg.seed < 2**32 - 1:
        raise ValueError(f"seed = {cfg.seed} is outside (0, 2**32 - 1). Fix: pass --seed in that range, e.g. 7.")
    unknown = [t for t in cfg.trackers if t not in TRACKERS]
    if unknown:
        raise ValueError(f"Unknown trackers {unknown}. Fix: pass --trackers as a subset of {list(TRACKERS)}, "
                         "e.g. --trackers '[jsonl]'.")
    for name in ("save_interval", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} = {getattr(cfg, name)} must be positive. Fix: pass --{name} >= 1.")
    if cfg.eval_interval is not None:
        if cfg.eval_interval < 1:
            raise ValueError(f"eval_interval = {cfg.eval_interval} must be >= 1. Fix: pass --eval_interval N (steps "
                             "between closed-loop evaluations), or omit it (null) for none.")
        validate_sim_eval(cfg.sim_eval, "--sim_eval.")
    if cfg.stop_after_steps is not None and cfg.stop_after_steps < 1:
        raise ValueError(f"stop_after_steps = {cfg.stop_after_steps} must be >= 1 (or null to train to the end).")
    if cfg.signal_save_budget_s is not None and not (math.isfinite(cfg.signal_save_budget_s)
                                                     and cfg.signal_save_budget_s >= 0):
        raise ValueError(f"signal_save_budget_s = {cfg.signal_save_budget_s} must be a finite number >= 0 (or null to "
                         "always save on a stop signal).")
    if cfg.peak_device_tflops is not None and not (math.isfinite(cfg.peak_device_tflops) and cfg.peak_device_tflops > 0):
        raise ValueError(f"peak_device_tflops = {cfg.peak_device_tflops} must be a finite positive number (or null to "
                         "take it from the device name; known: A100, H100, H200).")
    if cfg.prefetch_batches < 0:
        raise ValueError(f"prefetch_batches = {cfg.prefetch_batches} is negative. Fix: pass --prefetch_batches 0 (no "
                         "background thread) or a small positive queue depth such as 2.")
    if cfg.save_consolidated not in SAVE_CONSOLIDATED:
        raise ValueError(f"save_consolidated = {cfg.save_consolidated!r} is not one of {list(SAVE_CONSOLIDATED)}. Fix: "
                         "pass --save_consolidated end (the run's last checkpoint), every (each checkpoint) or never.")
    if cfg.keep_last_k is not None and cfg.keep_last_k < 1:
        raise ValueError(f"keep_last_k = {cfg.keep_last_k} must be >= 1. Fix: pass --keep_last_k >= 1, or null "
                         "to keep every checkpoint.")
    for name in ("run_id", "run_id_note"):
        value = getattr(cfg, name)
        if value is not None and (not value or "/" in value or value in (".", "..")):
            raise ValueError(f"{name} = {value!r} cannot be part of a directory name. Fix: pass a --{name} "
                             "without '/'.")
    token = cfg.hf_token
    if isinstance(token, str) and (not _ENV_NAME.fullmatch(token) or _HF_TOKEN.fullmatch(token)):
        raise ValueError(
            f"hf_token = {token[:3]}... is not an environment variable name (it looks like a token, which "
            "would be written to config.yaml). Fix: put the token in a file (default .hf_token) or in an environment "
            "variable, and pass --hf_token <VARIABLE_NAME>."
        )
    for directory in cfg.registry_dirs:
        if not Path(directory).is_dir():
            raise ValueError(f"registry_dirs: {directory} is not a directory. Fix: pass existing directories of "
                             "dataset/mixture YAML files.")
    _validate_resume(cfg)


def write_run_configs(cfg: TrainConfig, run_dir: str | Path, model: dict | None = None) -> None:
    """Write `run_dir/config.yaml` (draccus dump) and `config.json` (that YAML as JSON, indent 2), atomically.

    The `vla` section starts with `"type": <vla_id>`; paths are strings; `hf_token` is its file path or variable
    name, never the token. config.yaml's first line is a comment recording whether `hf_token` is a path. `model`,
    the trained architecture as a run directory's `"model"` section, is added to config.json only (config.yaml stays
    a TrainConfig that draccus reads back).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark = HF_TOKEN_PATH_MARK if isinstance(cfg.hf_token, Path) else HF_TOKEN_ENV_MARK
    text = f"{mark}\n{draccus.dump(cfg, sort_keys=False)}"
    encoded = yaml.safe_load(text)
    if next(iter(encoded["vla"])) != "type":
        raise RuntimeError(f"draccus wrote the vla section with keys {list(encoded['vla'])[:3]}...; expected 'type' "
                           "first.")
    atomic_write_text(run_dir / "config.yaml", text)
    if model is not None:
        encoded["model"] = model
    atomic_write_text(run_dir / "config.json", json.dumps(encoded, indent=2))


def load_train_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig of `run_dir/config.yaml` (registered `vla.type` defaults, overridden by the file)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"Not a training run directory: {path} does not exist.")
    cfg = draccus.parse(TrainConfig, config_path=path, args=[])
    first_line = path.read_text().split("\n", 1)[0]
    if first_line == HF_TOKEN_PATH_MARK and isinstance(cfg.hf_token, str):
        cfg = dataclasses.replace(cfg, hf_token=Path(cfg.hf_token))
    return cfg


def resolve_hf_token(cfg: TrainConfig) -> str | None:
    """The Hugging Face token: a `Path` is read (stripped; None if the file does not exist), a `str` names an
    environment variable (None if unset). This is the reference train.py's meaning, not the converter's."""
    if isinstance(cfg.hf_token, Path):
        token = cfg.hf_token.read_text().strip() if cfg.hf_token.is_file() else None
    else:
        token = os.environ.get(cfg.hf_token)
    return token or None


def with_recipe_policy(args: list[str]) -> list[str]:
    """Command-line `args` in which `--vla.policy.<option>` overrides keep the recipe's other policy options.

    draccus rebuilds a choice field from its class defaults and needs its `type` whenever one of its options is
    given, so `--vla.type tiny-oft-diffusion --vla.policy.film true` would fail, and with `--vla.policy.type oft`
    would silently fall back to the L1 head. Here the recipe's (`--vla.type`, else the default entry's) policy
    options are added for every option not given, when the policy family is the recipe's."""
    given = _option_values(args)
    if not any(key.startswith("vla.policy.") for key in given):
        return args
    recipe = VLAConfig.get_choice_class(given.get("vla.type", TrainConfig().vla.vla_id))().policy
    if given.get("vla.policy.type", recipe.family) != recipe.family:
        return args
    added = [] if "vla.policy.type" in given else ["--vla.policy.type", recipe.family]
    for name, value in draccus.encode(recipe).items():
        if name != "type" and f"vla.policy.{name}" not in given:
            added += [f"--vla.policy.{name}", json.dumps(value)]
    return [*args, *added]


def _option_values(args: list[str]) -> dict[str, str]:
    """`{"vla.type": "x", ...}` of `--key value` and `--key=value` arguments."""
    values = {}
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            key, equals, value = arg[2:].partition("=")
            values[key] = value if equals else (args[index + 1] if index + 1 < len(args) else "")
    return values
