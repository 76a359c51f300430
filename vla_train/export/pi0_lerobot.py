"""π0 weights in LeRobot's PyTorch layout (`PI0Policy.state_dict()`, saved as `model.safetensors`), both ways.

LeRobot's keys (facts: docs/pi0_facts.md §6), with `P = model.paligemma_with_expert.paligemma`:
- `P.model.vision_tower.vision_model.*` <- our `vision_tower.*` (transformers' `SiglipVisionModel`);
- `P.model.multi_modal_projector.linear.*` <- `multi_modal_projector.linear.*`;
- `P.model.language_model.{embed_tokens, layers.N.*, norm}.*` <- `joint.vlm.*`, and `P.lm_head.weight`, tied to
  `embed_tokens` (written as the same tensor; a checkpoint that stores only one of the two fills the other);
- `model.paligemma_with_expert.gemma_expert.model.{layers.N.*, norm}.*` <- `joint.expert.*` (the expert's unused
  `lm_head` is neither written nor required);
- `model.{state_proj, action_in_proj, action_out_proj, action_time_mlp_in, action_time_mlp_out}.*` as ours.
Reading accepts keys with or without the leading `model.` and names every key it cannot place.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

State = dict[str, torch.Tensor]
_PALIGEMMA = "model.paligemma_with_expert.paligemma."
_EXPERT = "model.paligemma_with_expert.gemma_expert."
# (our prefix, LeRobot's prefix), most specific first
PREFIXES = (
    ("vision_tower.", _PALIGEMMA + "model.vision_tower.vision_model."),
    ("multi_modal_projector.", _PALIGEMMA + "model.multi_modal_projector."),
    ("joint.vlm.", _PALIGEMMA + "model.language_model."),
    ("joint.expert.", _EXPERT + "model."),
    ("", "model."),
)
LM_HEAD = _PALIGEMMA + "lm_head.weight"
EMBEDDINGS = _PALIGEMMA + "model.language_model.embed_tokens.weight"
UNUSED = (_EXPERT + "lm_head.weight",)
LEROBOT_FILE = "model.safetensors"


def to_lerobot(state: State) -> State:
    """Our `Pi0Model.state_dict()` -> LeRobot's keys (the tied `lm_head` added; tensors as given)."""
    out = {}
    for key, tensor in state.items():
        ours, theirs = next((o, t) for o, t in PREFIXES if key.startswith(o))
        out[theirs + key[len(ours):]] = tensor
    if EMBEDDINGS in out:
        out[LM_HEAD] = out[EMBEDDINGS]
    return out


def from_lerobot(state: State) -> State:
    """LeRobot's keys (with or without `model.`) -> ours. A ValueError lists the keys that have no place."""
    state = {key if key.startswith("model.") else "model." + key: tensor for key, tensor in state.items()}
    if EMBEDDINGS not in state and LM_HEAD in state:  # tied: some checkpoints keep only the head
        state[EMBEDDINGS] = state[LM_HEAD]
    out, unknown = {}, []
    for key, tensor in state.items():
        if key in UNUSED or key == LM_HEAD:
            continue
        match = next(((o, t) for o, t in PREFIXES[:-1] if key.startswith(t)), None)
        if match is None and key.count(".") == 2:  # model.<projection>.<weight|bias>
            match = PREFIXES[-1]
        if match is None:
            unknown.append(key)
            continue
        ours, theirs = match
        out[ours + key[len(theirs):]] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not in LeRobot's π0 layout, e.g. {unknown[:5]}; expected "
                         f"{_PALIGEMMA}{{model.vision_tower, model.multi_modal_projector, model.language_model}}.*, "
                         f"{_EXPERT}model.* and model.{{state_proj, action_in_proj, action_out_proj, "
                         "action_time_mlp_in, action_time_mlp_out}.*")
    return out


def save_lerobot(model: torch.nn.Module, directory: str | Path) -> Path:
    """`directory/model.safetensors` in LeRobot's layout (contiguous CPU copies; the tied head stored once more)."""
    path = Path(directory) / LEROBOT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in to_lerobot(model.state_dict()).items()}
    save_file(state, str(path))
    return path


def load_lerobot(model: torch.nn.Module, path: str | Path) -> None:
    """Load LeRobot π0 weights (`model.safetensors` or its directory) into our `Pi0Model`, strictly: every key of
    the model must come from the file and every file key must have a place (the unused ones aside)."""
    path = Path(path)
    path = path / LEROBOT_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass LeRobot's π0 model.safetensors or its directory.")
    state = from_lerobot(load_file(str(path)))
    missing = sorted(set(model.state_dict()) - set(state))
    extra = sorted(set(state) - set(model.state_dict()))
    if missing or extra:
        raise ValueError(f"{path} does not fit this π0 architecture: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {extra[:5]} ({len(extra)}). Build the model with the checkpoint's sizes.")
    model.load_state_dict(state, strict=True)
