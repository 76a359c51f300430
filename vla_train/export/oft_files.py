"""OpenVLA-OFT's per-step checkpoint files: write them beside a checkpoint, read them back, load them into an `OFTVLM`.

OFT saves, in each checkpoint directory, `<piece>--<step>_checkpoint.pt` (`<step>` an integer training step, or
`latest` when it keeps only the latest; Hub releases: `<piece>--checkpoint.pt`) for each piece in `OFT_PIECES`, plus
`dataset_statistics.json`; its evaluation code finds a piece by its stem and loads it by name (VLA-Adapter uses the
same conventions for its `action_head` and `proprio_projector`). Layouts (all tensors fp32 on CPU when written here):
- `action_head`: L1 head `model.{layer_norm1, fc1, mlp_resnet_blocks.{i}.ffn.{0,1}, layer_norm2, fc2}.*`, diffusion
  head `noise_predictor.mlp_resnet.{...same...}.*` (our module's own keys, see `vla_train/models/oft/heads.py`);
- `proprio_projector`, `noisy_action_projector` (diffusion only): `fc1.*`, `fc2.*`;
- `vision_backbone` (FiLM runs only): OFT's `FiLMedPrismaticVisionBackbone` state dict, keys relative to the
  backbone (`featurizer.*`, `fused_featurizer.*`, `export/oft_keys.py`); a LoRA run's is LoRA-wrapped
  (`export/oft_checkpoint.py` writes it so; reading merges it with `lora_adapter/adapter_config.json`'s alpha / r).
OFT trains with DDP, so released files often prefix every key with `module.`: stripped on read. A training run writes
these files from its gathered state (`export/oft_checkpoint.py`, also `oft_step_states` for an unsharded model).
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vla_train.atomic_io import atomic_torch_save, atomic_write_text
from vla_train.export.oft_keys import from_oft_state_dict
from vla_train.models.lora import is_lora_key, merge_lora_state
from vla_train.models.oft.film import FiLMedVisionBackbone

if TYPE_CHECKING:
    from vla_train.models.oft.model import OFTVLM

# OFT's file stem -> the `OFTVLM` attribute holding that module.
OFT_PIECES: dict[str, str] = {
    "action_head": "action_head",
    "proprio_projector": "proprio_projector",
    "noisy_action_projector": "noisy_action_projector",
    "vision_backbone": "vision_backbone",
}
DATASET_STATISTICS = "dataset_statistics.json"
LATEST = "latest"
DDP_PREFIX = "module."
VISION_PREFIX = "vision_backbone."
# `<piece>--<step>_checkpoint.pt`, `<piece>--latest_checkpoint.pt`, or (released on the Hugging Face Hub by OFT and
# VLA-Adapter) `<piece>--checkpoint.pt`, read as the latest.
_FILE_PATTERN = re.compile(rf"^({'|'.join(OFT_PIECES)})--(?:(\d+|{LATEST})_)?checkpoint\.pt$")
State = dict[str, torch.Tensor]
Step = int | str


def _normalize_step(step: Step) -> Step:
    """An integer step >= 0 (also given as digits) or `"latest"`; anything else is an error."""
    if isinstance(step, str) and step.isdigit():
        step = int(step)
    if (isinstance(step, int) and not isinstance(step, bool) and step >= 0) or step == LATEST:
        return step
    raise ValueError(f"An OFT checkpoint step is an integer >= 0 or {LATEST!r}, got {step!r}.")


def oft_file_name(piece: str, step: Step) -> str:
    """`("action_head", 1000)` -> `action_head--1000_checkpoint.pt`; `step="latest"` -> `action_head--latest_...`."""
    if piece not in OFT_PIECES:
        raise ValueError(f"Unknown OFT checkpoint piece {piece!r}; choose one of {sorted(OFT_PIECES)}.")
    return f"{piece}--{_normalize_step(step)}_checkpoint.pt"


def _model_pieces(model: "OFTVLM") -> dict[str, nn.Module | None]:
    """Each OFT piece -> the model's module for it, or None when the model has none (`vision_backbone` counts only
    once FiLM is applied: a plain backbone comes from the base weights, not from these files)."""
    modules = {piece: getattr(model, attribute, None) for piece, attribute in OFT_PIECES.items()}
    if not isinstance(modules["vision_backbone"], FiLMedVisionBackbone):
        modules["vision_backbone"] = None
    return {piece: module if isinstance(module, nn.Module) else None for piece, module in modules.items()}


def _jsonable(value: Any) -> Any:
    """`json.dumps` fallback: numpy arrays / scalars and tensors -> lists / numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"dataset statistics hold a {type(value).__name__}, which JSON cannot encode.")


def write_oft_step_files(states: Mapping[str, Mapping[str, torch.Tensor]], directory: Path, step: Step,
                         dataset_statistics: Mapping[str, Any] | None = None) -> list[Path]:
    """Write `<piece>--<step>_checkpoint.pt` for each piece in `states` (`export/oft_checkpoint.py` `oft_states`)
    and, if given, `dataset_statistics.json` (indent 2) into `directory`, each atomically. Returns the paths."""
    unknown = sorted(set(states) - set(OFT_PIECES))
    if unknown:
        raise ValueError(f"Not OFT checkpoint pieces: {unknown}; the pieces are {sorted(OFT_PIECES)}.")
    directory, paths = Path(directory), []
    for piece, state in states.items():
        path = directory / oft_file_name(piece, step)
        atomic_torch_save(dict(state), path)
        paths.append(path)
    if dataset_statistics is not None:
        path = directory / DATASET_STATISTICS
        atomic_write_text(path, json.dumps(dataset_statistics, indent=2, default=_jsonable) + "\n")
        paths.append(path)
    return paths


def _found_steps(directory: Path) -> dict[Step, list[str]]:
    """Step -> the OFT piece files present for it in `directory`."""
    if not directory.is_dir():
        raise FileNotFoundError(f"OFT checkpoint directory {directory} does not exist (or is not a directory).")
    found: dict[Step, list[str]] = {}
    for path in sorted(directory.iterdir()):
        match = _FILE_PATTERN.match(path.name)
        if match:
            step = match.group(2) or LATEST
            found.setdefault(int(step) if step.isdigit() else step, []).append(path.name)
    return found


def find_oft_step(directory: Path, step: Step | None = None) -> Step:
    """The step whose OFT files to read from `directory`: `step` if files for it exist; with `step=None`, the highest
    integer step present, else `"latest"` when only `--latest_checkpoint.pt` files exist."""
    directory = Path(directory)
    found = _found_steps(directory)
    if step is not None:
        step = _normalize_step(step)
        if step in found:
            return step
    elif found:
        numbered = [s for s in found if isinstance(s, int)]
        return max(numbered) if numbered else LATEST
    present = sorted(p.name for p in directory.iterdir())
    what = (f"steps {sorted(found, key=str)} ({sum(map(len, found.values()))} files)" if found
            else f"no '<piece>--<step>_checkpoint.pt' file among {present[:12]}{' ...' if len(present) > 12 else ''}")
    wanted = f"for step {step!r}" if step is not None else "at any step"
    raise FileNotFoundError(f"No OpenVLA-OFT / VLA-Adapter checkpoint files {wanted} in {directory}: found {what}. "
                            f"Pass one of the steps found, or the directory that holds e.g. "
                            f"{oft_file_name('action_head', 1000)}.")


def piece_path(directory: Path, piece: str, step: Step) -> Path:
    """The file of `piece` at `step` in `directory`; for the latest, the Hub's step-less name when only it exists."""
    path = Path(directory) / oft_file_name(piece, step)
    stepless = Path(directory) / f"{piece}--checkpoint.pt"
    return stepless if step == LATEST and not path.is_file() and stepless.is_file() else path


def _read_state(path: Path) -> State:
    """One OFT file -> its state dict, a leading `module.` (DDP) removed from every key."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        raise ValueError(f"Cannot read OFT checkpoint file {path} ({type(error).__name__}: {error}); it should be a "
                         "torch.save'd state dict (re-copy or re-save it).") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"OFT checkpoint file {path} holds a {type(state).__name__}, not a state dict of tensors.")
    stripped = {str(key).removeprefix(DDP_PREFIX): tensor for key, tensor in state.items()}
    if len(stripped) != len(state):
        raise ValueError(f"OFT checkpoint file {path} has keys both with and without the DDP prefix {DDP_PREFIX!r}.")
    return stripped


def read_oft_step_files(directory: Path, step: Step | None = None) -> dict[str, State]:
    """Piece -> state dict (OFT's layout, `module.` stripped) for every piece file present at the step chosen by
    `find_oft_step(directory, step)`."""
    directory = Path(directory)
    found = find_oft_step(directory, step)
    paths = {piece: piece_path(directory, piece, found) for piece in OFT_PIECES}
    return {piece: _read_state(path) for piece, path in paths.items() if path.is_file()}


def _extra_piece_hint(piece: str, state: State) -> str:
    """How to build the model so that it has `piece` (OFT's training flag in parentheses)."""
    if piece == "proprio_projector":
        width = state["fc1.weight"].shape[1] if "fc1.weight" in state else "<proprio dim>"
        return f"build the OFTVLM with proprio_dim={width} (OFT's use_proprio=True)"
    if piece == "noisy_action_projector":
        return "build the OFTVLM with head='diffusion' (OFT's use_diffusion=True)"
    return ("apply FiLM to the model's vision backbone first (vla_train.models.oft.film.apply_film; OFT's "
            "use_film=True)")


def _missing_piece_hint(piece: str, model: "OFTVLM") -> str:
    """Why a piece the model has may lack a file, and what to change."""
    if piece == "proprio_projector":
        return (f"the model was built with proprio_dim={model.proprio_dim}: build it without proprio_dim "
                "(OFT's use_proprio=False), or point at a run trained with proprio")
    if piece == "noisy_action_projector":
        return "the checkpoint is not a diffusion run: build the OFTVLM with head='l1' (OFT's use_l1_regression=True)"
    return "every OFT run saves its action head: point at an OFT checkpoint directory"


def _check_state(module: nn.Module, state: State, path: Path, piece: str) -> None:
    """Strict key and shape check of `state` against `module.state_dict()`; errors name the file and the keys."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if piece == "action_head":
            kind = "diffusion" if any(k.startswith("noise_predictor.") for k in state) else "l1"
            hint = f" The file holds a {kind!r} head: build the OFTVLM with head={kind!r}."
        raise ValueError(f"{path} does not match the model's {piece}: missing keys {missing[:6]}, unexpected keys "
                         f"{unexpected[:6]} ({len(missing)} / {len(unexpected)} in all).{hint}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ValueError(f"{path}: {piece} key {key!r} has shape {tuple(state[key].shape)} in the file but "
                             f"{tuple(tensor.shape)} in the model; build the model with the checkpoint's sizes "
                             "(action_dim, proprio_dim, head_hidden_dim, LLM).")


def lora_scaling(directory: Path) -> float:
    """alpha / r of the `lora_adapter/adapter_config.json` beside OFT's files (how its LoRA-wrapped ViT merges)."""
    config = Path(directory) / "lora_adapter" / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"The vision_backbone file in {directory} holds LoRA-wrapped weights but {config} "
                                "does not exist: copy the run's lora_adapter/ next to it (its alpha and r merge them).")
    values = json.loads(config.read_text())
    return float(values["lora_alpha"]) / float(values["r"])


def native_vision_state(state: State, backbone: FiLMedVisionBackbone, path: Path) -> State:
    """OFT's `vision_backbone--*` layout (keys relative to the backbone, or prefixed `vision_backbone.`; LoRA-wrapped
    linears merged with `lora_adapter/`'s alpha / r) -> our `FiLMedVisionBackbone` keys."""
    state = {key if key.startswith(VISION_PREFIX) else VISION_PREFIX + key: tensor for key, tensor in state.items()}
    if any(is_lora_key(key) or ".base_layer." in key for key in state):
        state = merge_lora_state(state, lora_scaling(path.parent))
    try:
        return from_oft_state_dict(state, backbone.keys)
    except ValueError as error:
        raise ValueError(f"{path} is not in OFT's FiLMed vision backbone layout: {error}") from error


def load_oft_step_files(model: "OFTVLM", directory: Path, step: Step | None = None) -> list[str]:
    """Load the OFT piece files at `step` (see `find_oft_step`) from `directory` into `model`, strictly: every file
    must have a module on the model and every module a file (except `vision_backbone`, which the base weights may
    provide), with the same keys and shapes. Everything is checked before anything is loaded. Returns the pieces
    loaded, in `OFT_PIECES` order."""
    directory = Path(directory)
    found = find_oft_step(directory, step)
    states, modules = read_oft_step_files(directory, found), _model_pieces(model)
    path = {piece: piece_path(directory, piece, found) for piece in OFT_PIECES}
    for piece, state in states.items():
        if modules[piece] is None:
            hint = _extra_piece_hint(piece, state)
            raise ValueError(f"{path[piece]} holds a {piece}, but the model has none: {hint}.")
    for piece, module in modules.items():
        if module is not None and piece not in states and piece != "vision_backbone":
            raise FileNotFoundError(f"The model has a {piece} but {path[piece]} does not exist (found "
                                    f"{sorted(states)} at step {found!r}): {_missing_piece_hint(piece, model)}.")
    native: dict[str, tuple[nn.Module, State]] = {}
    for piece, state in states.items():
        module = modules[piece]
        assert module is not None  # checked above
        if isinstance(module, FiLMedVisionBackbone):
            state = native_vision_state(state, module, path[piece])
        _check_state(module, state, path[piece], piece)
        native[piece] = (module, state)
    with torch.no_grad():
        for module, state in native.values():
            module.load_state_dict(state, strict=True)
    return list(native)
