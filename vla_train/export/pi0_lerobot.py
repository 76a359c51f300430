"""π0 weights in LeRobot's PyTorch layout (`PI0Policy.state_dict()`, saved as `model.safetensors`), both ways.

LeRobot's keys (facts: docs/pi0_facts.md §6), with `P = model.paligemma_with_expert.paligemma` and ours from
`Pi0VLM.state_dict()`:
- `P.model.vision_tower.vision_model.*` (transformers' `SiglipVisionModel`) <- our timm featurizer
  `vision_backbone.featurizer.*`: `embeddings.patch_embedding` <- `patch_embed.proj`, `embeddings.position_embedding
  .weight [P, D]` <- `pos_embed [1, P, D]`, `encoder.layers.N.{layer_norm1, layer_norm2, mlp.fc1, mlp.fc2,
  self_attn.out_proj}` <- `blocks.N.{norm1, norm2, mlp.fc1, mlp.fc2, attn.proj}`, `self_attn.{q,k,v}_proj` <- the
  thirds of `blocks.N.attn.qkv` (timm's fused projection, q first), `post_layernorm` <- `norm`;
- `P.model.multi_modal_projector.linear.*` <- `projector.projector.0.*`;
- `P.model.language_model.{embed_tokens, layers.N.*, norm}.*` <- `llm_backbone.llm.model.*` (the expert's layers
  aside), and `P.lm_head.weight`, tied to `embed_tokens` (a checkpoint that stores only one of the two fills both);
- `model.paligemma_with_expert.gemma_expert.model.layers.N.*` <- `llm_backbone.llm.model.layers.N.expert.*`,
  `...gemma_expert.model.norm.*` <- `expert_norm.*` (the expert's unused `lm_head` is neither written nor required);
- `model.{state_proj, action_in_proj, action_out_proj, action_time_mlp_in, action_time_mlp_out}.*` as ours.
Reading accepts keys with or without the leading `model.` and names every key it cannot place.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vla_train.models.run_dir import check_state_fits

State = dict[str, torch.Tensor]
_PALIGEMMA = "model.paligemma_with_expert.paligemma."
_EXPERT = "model.paligemma_with_expert.gemma_expert."
_VISION_OURS, _VISION = "vision_backbone.featurizer.", _PALIGEMMA + "model.vision_tower.vision_model."
_LLM_OURS = "llm_backbone.llm.model."
LM_HEAD = _PALIGEMMA + "lm_head.weight"
EMBEDDINGS = _PALIGEMMA + "model.language_model.embed_tokens.weight"
UNUSED = (_EXPERT + "lm_head.weight",)
LEROBOT_FILE = "model.safetensors"
SUFFIX_MODULES = ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out")
# (ours, theirs) key patterns; `{}` is a layer index. Most specific first.
RENAMES = (
    (_LLM_OURS + "layers.{}.expert.", _EXPERT + "model.layers.{}."),
    ("expert_norm.", _EXPERT + "model.norm."),
    (_LLM_OURS, _PALIGEMMA + "model.language_model."),
    ("projector.projector.0.", _PALIGEMMA + "model.multi_modal_projector.linear."),
    (_VISION_OURS + "patch_embed.proj.", _VISION + "embeddings.patch_embedding."),
    (_VISION_OURS + "blocks.{}.norm1.", _VISION + "encoder.layers.{}.layer_norm1."),
    (_VISION_OURS + "blocks.{}.norm2.", _VISION + "encoder.layers.{}.layer_norm2."),
    (_VISION_OURS + "blocks.{}.mlp.", _VISION + "encoder.layers.{}.mlp."),
    (_VISION_OURS + "blocks.{}.attn.proj.", _VISION + "encoder.layers.{}.self_attn.out_proj."),
    (_VISION_OURS + "norm.", _VISION + "post_layernorm."),
    *((f"{name}.", f"model.{name}.") for name in SUFFIX_MODULES),
)
_QKV = re.compile(re.escape(_VISION_OURS) + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_QKV_THEIRS = re.compile(re.escape(_VISION) + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
POS_EMBED, POSITION_EMBEDDING = _VISION_OURS + "pos_embed", _VISION + "embeddings.position_embedding.weight"


def _pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(r"\{\}", r"(\d+)"))


_RULES = [(_pattern(ours), ours, _pattern(theirs), theirs) for ours, theirs in RENAMES]


def _rename(key: str, to_theirs: bool) -> str | None:
    """`key` under the first matching rule (None: no rule places it)."""
    for ours_re, ours, theirs_re, theirs in _RULES:
        source, target = (ours_re, theirs) if to_theirs else (theirs_re, ours)
        match = source.match(key)
        if match:
            return (target.replace("{}", match.group(1)) if match.groups() else target) + key[match.end():]
    return None


def to_lerobot(state: State) -> State:
    """Our `Pi0VLM.state_dict()` -> LeRobot's keys (qkv split, position embedding squeezed, tied head added)."""
    out = {}
    for key, tensor in state.items():
        qkv = _QKV.match(key)
        if qkv:
            for name, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                out[f"{_VISION}encoder.layers.{qkv[1]}.self_attn.{name}_proj.{qkv[2]}"] = part
        elif key == POS_EMBED:
            out[POSITION_EMBEDDING] = tensor[0]
        elif key != "llm_backbone.llm.lm_head.weight":  # tied: written from the embeddings below
            theirs = _rename(key, to_theirs=True)
            if theirs is None:
                raise ValueError(f"π0 key {key!r} has no place in LeRobot's layout: not a Pi0VLM state dict?")
            out[theirs] = tensor
    if EMBEDDINGS in out:
        out[LM_HEAD] = out[EMBEDDINGS]
    return out


def from_lerobot(state: State) -> State:
    """LeRobot's keys (with or without `model.`) -> ours. A ValueError lists the keys that have no place."""
    state = {key if key.startswith("model.") else "model." + key: tensor for key, tensor in state.items()}
    if EMBEDDINGS not in state and LM_HEAD in state:  # tied: some checkpoints keep only the head
        state[EMBEDDINGS] = state[LM_HEAD]
    out, qkv, unknown = {}, {}, []
    for key, tensor in state.items():
        if key in UNUSED or key == LM_HEAD:
            continue
        split = _QKV_THEIRS.match(key)
        if split:
            qkv.setdefault((split[1], split[3]), {})[split[2]] = tensor
            continue
        ours = _VISION_OURS + "pos_embed" if key == POSITION_EMBEDDING else _rename(key, to_theirs=False)
        if ours is None:
            unknown.append(key)
        else:
            out[ours] = tensor[None] if key == POSITION_EMBEDDING else tensor
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not in LeRobot's π0 layout, e.g. {unknown[:5]}; expected "
                         f"{_PALIGEMMA}{{model.vision_tower, model.multi_modal_projector, model.language_model}}.*, "
                         f"{_EXPERT}model.* and model.{{{', '.join(SUFFIX_MODULES)}}}.*")
    for (layer, kind), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise ValueError(f"LeRobot π0 vision layer {layer} lacks self_attn {sorted(set('qkv') - set(parts))}_proj."
                             f"{kind}.")
        out[f"{_VISION_OURS}blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in "qkv"])
    out["llm_backbone.llm.lm_head.weight"] = out.get(_LLM_OURS + "embed_tokens.weight")
    return {key: value for key, value in out.items() if value is not None}


def save_lerobot(model: torch.nn.Module, directory: str | Path, state: State | None = None) -> Path:
    """`directory/model.safetensors` in LeRobot's layout from `model`'s weights (or a full `state` of it:
    contiguous CPU copies; the tied head stored once more, as LeRobot saves it)."""
    path = Path(directory) / LEROBOT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    source = model.state_dict() if state is None else state
    tensors = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in to_lerobot(source).items()}
    save_file(tensors, str(path))
    return path


def read_lerobot(path: str | Path) -> State:
    """Our keys from LeRobot π0 weights (`model.safetensors` or its directory)."""
    path = Path(path)
    path = path / LEROBOT_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass LeRobot's π0 model.safetensors or its directory.")
    return from_lerobot(load_file(str(path)))


def load_lerobot(model: torch.nn.Module, path: str | Path) -> None:
    """Load LeRobot π0 weights into our `Pi0VLM`, strictly: every key of the model must come from the file with its
    shape, and every file key must have a place (the unused ones aside)."""
    state = read_lerobot(path)
    check_state_fits(model, state, "π0", path)
    model.load_state_dict(state, strict=True)
