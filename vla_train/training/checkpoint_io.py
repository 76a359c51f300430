"""File-level helpers for `checkpoint.py`: reference names, atomic writes, per-rank RNG state, the consolidated layout.

Names follow the reference (facts §1.4): `step-{step:06d}-epoch-{epoch:02d}-loss={loss:.4f}` (`loss=inf` when None),
used both for the sharded DCP directory and, with `.pt`, for the consolidated reference checkpoint next to it.
"""

import io
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import draccus
import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from vla_train.atomic_io import atomic_torch_save
from vla_train.config.lora import LoRAConfig
from vla_train.log import logger
from vla_train.models.lora import is_lora_key, merge_lora_state
from vla_train.models.vlm import ALL_MODULE_KEYS

COMPLETE_MARKER = "complete.json"
# 2: the marker records every file's size and the consolidated `.pt`'s; 3: rank files hold a `states` dict (named
# per-rank Stateful states) instead of `data_state`/`rng`, the `.pt` is optional. Versions 2 and 3 are read.
FORMAT_VERSION = 3
TMP_CONSOLIDATED = "consolidated.pt"  # the `.pt` inside the temporary directory, moved next to it at commit
CHECKPOINT_NAME_RE = re.compile(r"^step-(?P<step>\d+)-epoch-(?P<epoch>\d+)-loss=(?P<loss>[^/]+?)$")
WRAPPER_NAME_PARTS = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})
# Consolidated file order as the reference writes it (facts §4.7).
MODULE_KEYS = ("vision_backbone", "projector", "llm_backbone")
assert set(MODULE_KEYS) == set(ALL_MODULE_KEYS)
TEMP_PREFIXES = (".step-", ".latest-checkpoint.pt.")


def checkpoint_name(step: int, epoch: int, loss: float | None) -> str:
    """The reference's checkpoint stem, e.g. `step-002500-epoch-01-loss=0.4321`."""
    loss_str = "inf" if loss is None else f"{float(loss):.4f}"
    return f"step-{step:06d}-epoch-{epoch:02d}-loss={loss_str}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """`(step, epoch)` of a checkpoint stem (a `.pt` suffix is accepted), or None for any other name."""
    match = CHECKPOINT_NAME_RE.match(name.removesuffix(".pt"))
    return (int(match["step"]), int(match["epoch"])) if match else None


def consolidated_path(checkpoint_dir: Path) -> Path:
    """`.../step-...-loss=X.XXXX.pt` for a DCP directory (not `with_suffix`: the loss has a dot)."""
    return checkpoint_dir.with_name(checkpoint_dir.name + ".pt")


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    """The completion marker of a DCP checkpoint directory; a clear error when the directory is incomplete."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}): the save that wrote it "
                                "was interrupted, or it is not a vla-train checkpoint directory.")
    return json.loads(marker.read_text())


def file_sizes(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """`{relative path: size in bytes}` of every file below `directory` but the completion marker and `exclude`."""
    return {str(path.relative_to(directory)): path.stat().st_size for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name not in (COMPLETE_MARKER, *exclude)}


def utc_stamp() -> str:
    """The current UTC time as `YYYYMMDDTHHMMSS`, for the names of backup files."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


def atomic_link_or_copy(src: Path, dst: Path) -> None:
    """Point `dst` at `src`'s content atomically: a hard link (no copy of a 30 GB file), else a copy, then rename."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def remove_checkpoint_dir(path: Path) -> None:
    """Delete the marker first, so that a kill during deletion leaves an incomplete (ignored) directory."""
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(checkpoint_dir: Path) -> None:
    """Delete what interrupted saves left behind (temporary directories and files); call when no save is running."""
    for path in checkpoint_dir.iterdir():
        if path.name.startswith(TEMP_PREFIXES):
            logger.info("Removing %s, left by an interrupted save.", path)
            if path.is_dir():
                remove_checkpoint_dir(path)
            else:
                path.unlink(missing_ok=True)


def to_blob(obj: Any) -> bytes:
    """One opaque DCP item (`torch.save` bytes): loads back without a template of its keys."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_blob(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=False)


def capture_rng_state() -> dict[str, Any]:
    """This process's python `random`, numpy, torch CPU and (when in use) current CUDA device RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            logger.warning("The checkpoint holds a CUDA RNG state but CUDA is not available; it is not restored.")


def unwrapped_key(key: str) -> str:
    """Drop activation-checkpointing / torch.compile / FSDP1 wrapper parts from a state-dict key."""
    return ".".join(part for part in key.split(".") if part not in WRAPPER_NAME_PARTS)


def split_module_state(full_state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A full model state dict -> `{"vision_backbone": sd, "projector": sd, "llm_backbone": sd, <policy module>: sd,
    ...}` (the VLM's three first, a policy family's own modules, e.g. OFT's `action_head`, after), floats in FP32."""
    modules: dict[str, dict[str, torch.Tensor]] = {key: {} for key in MODULE_KEYS}
    for key, tensor in full_state.items():
        prefix, _, rest = unwrapped_key(key).partition(".")
        if not prefix or not rest:
            raise ValueError(f"State-dict key {key!r} is not under a module: not a PrismaticVLM state dict.")
        modules.setdefault(prefix, {})[rest] = tensor.float() if tensor.is_floating_point() else tensor
    empty = [key for key in MODULE_KEYS if not modules[key]]
    if empty:
        raise ValueError(f"The state dict has no {empty} tensors (has {sorted(modules)}): not a PrismaticVLM.")
    return modules


def rank_states(rank_file: dict[str, Any]) -> dict[str, Any]:
    """The named per-rank states of a rank file; version-2 files (`data_state`, `rng`) as `{"data", "rng"}`."""
    if "states" in rank_file:
        return rank_file["states"]
    return {"data": rank_file["data_state"], "rng": rank_file["rng"]}


def run_lora_config(run_dir: Path) -> LoRAConfig:
    """The LoRA options a run directory's config.json records (`vla.lora`); an error when it records none."""
    config = run_dir / "config.json"
    lora = json.loads(config.read_text()).get("vla", {}).get("lora") if config.is_file() else None
    if not lora or not lora.get("enabled"):
        raise ValueError(f"The checkpoint holds LoRA adapters but {config} records no enabled vla.lora: cannot merge "
                         "them. Fix: consolidate the checkpoint inside its run directory.")
    return draccus.decode(LoRAConfig, lora)


def consolidate_checkpoint(checkpoint_dir: Path) -> Path:
    """The consolidated `.pt` of a complete DCP checkpoint, written now (single process, no process group) when the
    checkpoint was saved without one: the model's tensors read from the shards, upcast to FP32 (a frozen backbone
    trained in bf16 is stored as bf16), the EMA weights laid over the trainable ones when the run kept an EMA (as an
    online consolidated save writes them), written atomically next to the directory. Returns the `.pt` path."""
    target = consolidated_path(checkpoint_dir)
    if target.is_file():
        return target
    read_marker(checkpoint_dir)  # raises for an incomplete directory
    logger.info("Consolidating %s into %s (it was saved without a consolidated .pt)", checkpoint_dir, target.name)
    loaded: dict[str, Any] = {}
    _load_state_dict(loaded, storage_reader=FileSystemReader(checkpoint_dir),
                     planner=_EmptyStateDictLoadPlanner(keys={"model", "ema"}), no_dist=True)
    if not loaded.get("model"):
        raise ValueError(f"{checkpoint_dir} holds no model tensors: not a vla-train training checkpoint.")
    state = {**loaded["model"], **loaded.get("ema", {})}  # the EMA's keys are those of the trainable tensors
    if any(is_lora_key(key) for key in state):  # merged, as a consolidated save writes it
        state = merge_lora_state(state, run_lora_config(checkpoint_dir.parents[1]).scaling)
    atomic_torch_save({"model": split_module_state(state)}, target)
    return target
