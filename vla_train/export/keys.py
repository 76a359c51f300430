"""State-dict key mapping between a consolidated Prismatic checkpoint and the reference Hugging Face layout.

Consolidated `.pt` (`{"model": {"vision_backbone", "projector", "llm_backbone"}}`) -> HF keys (facts §10.2):
- vision: `featurizer.*` (one featurizer) or `<first>_featurizer.*` (fused: the DINO) -> `vision_backbone.featurizer.*`,
  `<second>_featurizer.*` (SigLIP / CLIP) -> `vision_backbone.fused_featurizer.*`; a timm LayerScale `gamma` becomes
  `scale_factor` (transformers renames keys containing `gamma` on load);
- projector: `projector.{0,2,4}.*` -> `projector.fc{1,2,3}.*`;
- LLM: `llm.*` -> `language_model.*`.
The mapping is a bijection on the keys a model has, so `hf_to_native(native_to_hf(x)) == x`.
"""

from collections.abc import Mapping, Sequence

import torch

HF_FEATURIZERS = ("featurizer", "fused_featurizer")
PROJECTOR_LAYERS = {"0": "fc1", "2": "fc2", "4": "fc3"}
LAYER_SCALE_NATIVE, LAYER_SCALE_HF = "gamma", "scale_factor"
MODULE_KEYS = ("vision_backbone", "projector", "llm_backbone")


def native_featurizer_names(featurizer_keys: Sequence[str]) -> list[str]:
    """Module names of a VisionBackbone's featurizers: `featurizer`, or `dino_featurizer`, `siglip_featurizer`, ..."""
    return [f"{key}_featurizer" if key else "featurizer" for key in featurizer_keys]


def _rename_last(key: str, old: str, new: str) -> str:
    head, _, last = key.rpartition(".")
    return f"{head}.{new}" if last == old else key


def native_to_hf(modules: Mapping[str, Mapping[str, torch.Tensor]],
                 featurizer_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """`{"vision_backbone": sd, "projector": sd, "llm_backbone": sd}` -> one HF state dict (same tensors)."""
    names = dict(zip(native_featurizer_names(featurizer_keys), HF_FEATURIZERS, strict=False))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in modules["vision_backbone"].items():
        module, _, rest = key.partition(".")
        if module not in names:
            raise ValueError(f"vision_backbone key {key!r} belongs to none of the featurizers {sorted(names)}.")
        out[f"vision_backbone.{names[module]}.{_rename_last(rest, LAYER_SCALE_NATIVE, LAYER_SCALE_HF)}"] = tensor
    for key, tensor in modules["projector"].items():
        prefix, index, param = key.split(".", 2) if key.count(".") == 2 else (key, "", "")
        if prefix != "projector" or index not in PROJECTOR_LAYERS:
            raise ValueError(f"projector key {key!r} is not projector.{{0,2,4}}.{{weight,bias}}.")
        out[f"projector.{PROJECTOR_LAYERS[index]}.{param}"] = tensor
    for key, tensor in modules["llm_backbone"].items():
        if not key.startswith("llm."):
            raise ValueError(f"llm_backbone key {key!r} does not start with 'llm.'.")
        out[f"language_model.{key.removeprefix('llm.')}"] = tensor
    return out


def hf_to_native(state: Mapping[str, torch.Tensor],
                 featurizer_keys: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """One HF state dict -> `{"vision_backbone": sd, "projector": sd, "llm_backbone": sd}`; unknown keys are errors."""
    names = dict(zip(HF_FEATURIZERS, native_featurizer_names(featurizer_keys), strict=False))
    layers = {v: k for k, v in PROJECTOR_LAYERS.items()}
    modules: dict[str, dict[str, torch.Tensor]] = {key: {} for key in MODULE_KEYS}
    unknown = []
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "vision_backbone" and len(parts) > 2 and parts[1] in names:
            rest = _rename_last(".".join(parts[2:]), LAYER_SCALE_HF, LAYER_SCALE_NATIVE)
            modules["vision_backbone"][f"{names[parts[1]]}.{rest}"] = tensor
        elif parts[0] == "projector" and len(parts) == 3 and parts[1] in layers:
            modules["projector"][f"projector.{layers[parts[1]]}.{parts[2]}"] = tensor
        elif parts[0] == "language_model" and len(parts) > 1:
            modules["llm_backbone"][f"llm.{key.removeprefix('language_model.')}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Unexpected weight keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
                         f"({len(unknown)} in all): not vision_backbone.{{{', '.join(names)}}}.*, projector.fc*.* or "
                         "language_model.*.")
    return modules
