"""Prismatic run directories: save and load a base VLM (or VLA) in the reference's layout, in FP32.

Layout (facts §4.7): `run_dir/config.json` with a `"model"` section (`model_id`, `vision_backbone_id`,
`llm_backbone_id`, `arch_specifier`, `image_resize_strategy`, `llm_max_length`, and this project's `llm_config` when
the LLM's architecture is not the registry's), and
`run_dir/checkpoints/latest-checkpoint.pt` holding `{"model": {"vision_backbone": sd, "projector": sd,
"llm_backbone": sd}}`. `projector` and `llm_backbone` are required; a checkpoint without `vision_backbone` (the
released Prismatic base VLMs) keeps the featurizers' pretrained timm weights, read from the local Hugging Face cache.
"""

import json
import mmap
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from huggingface_hub import try_to_load_from_cache

from vla_train.atomic_io import atomic_torch_save
from vla_train.config.model import ModelConfig, model_config_from_fields, model_config_section
from vla_train.config.policy import PolicyConfig, read_policy_config
from vla_train.log import logger
from vla_train.models.build import build_vlm, check_all_fp32
from vla_train.models.openvla import NormStats
from vla_train.models.vision import VisionBackbone
from vla_train.models.vlm import ALL_MODULE_KEYS, PrismaticVLM

CHECKPOINT_SUBDIR = "checkpoints"
LATEST_CHECKPOINT = "latest-checkpoint.pt"
REQUIRED_MODULE_KEYS = ("projector", "llm_backbone")
MODEL_ID_KEYS = ("model_id", "vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy")
MODEL_ZOO_ENV = "VLA_TRAIN_MODEL_ZOO"


def model_state_dicts(vlm: PrismaticVLM, module_keys: tuple[str, ...] = ALL_MODULE_KEYS) -> dict[str, dict]:
    """`{"vision_backbone": sd, "projector": sd, "llm_backbone": sd}` as the reference checkpoint stores them."""
    return {key: getattr(vlm, key).state_dict() for key in module_keys}


def save_base_vlm(vlm: PrismaticVLM, model_cfg: ModelConfig, run_dir: str | Path) -> Path:
    """Write `config.json` and `checkpoints/latest-checkpoint.pt` (all three modules); returns the checkpoint path."""
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT_SUBDIR / LATEST_CHECKPOINT
    atomic_torch_save({"model": model_state_dicts(vlm)}, ckpt)
    config = {"model": model_config_section(model_cfg)}
    tmp = run_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, run_dir / "config.json")
    return ckpt


def read_model_config(run_dir: Path) -> ModelConfig:
    """The ModelConfig of a run directory: its `config.json` "model" section (a base-VLM run), or, for a VLA training
    run, the ModelConfig of its `vla.base_vlm` (a registered model id or a base run directory, which the reference
    could not reload)."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"Not a Prismatic run directory: {config_path} does not exist.")
    content = json.loads(config_path.read_text())
    section = content.get("model")
    if section is None and isinstance(content.get("vla"), dict) and "base_vlm" in content["vla"]:
        base_vlm = str(content["vla"]["base_vlm"])
        if base_vlm in ModelConfig.get_known_choices():
            return ModelConfig.get_choice_class(base_vlm)()
        return read_model_config(Path(base_vlm))
    if not isinstance(section, dict) or any(key not in section for key in MODEL_ID_KEYS):
        raise ValueError(f"{config_path} needs a 'model' section with keys {list(MODEL_ID_KEYS)} (or a 'vla' "
                         f"section naming its base_vlm).")
    return model_config_from_fields({"llm_max_length": 2048, **section})


def check_module_state(expected: Mapping[str, torch.Size | Sequence[int]], state: Mapping[str, torch.Tensor],
                       name: str, source: str | Path) -> None:
    """Raise a ValueError naming missing / unexpected keys (up to 8 each) or the first shape mismatch (both shapes)."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ValueError(f"{source}: '{name}' weights do not match the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)}).")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise ValueError(f"{source}: shape mismatch for '{name}.{key}': checkpoint {tuple(tensor.shape)}, model "
                             f"{tuple(expected[key])}.")


def check_state_fits(module: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str,
                     source: str | Path) -> None:
    """`check_module_state` against `module`'s own state-dict keys and shapes (a meta-device module will do)."""
    check_module_state({key: value.shape for key, value in module.state_dict().items()}, state, name, source)


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str, source: Path,
                      keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Strict load with errors naming the file, the key and both shapes; the keys in `keep` (modules a policy adds,
    absent from `state`) keep their current values."""
    expected = {key: value.shape for key, value in module.state_dict().items() if key not in keep}
    check_module_state(expected, state, name, source)
    module.load_state_dict(state, strict=not keep)


def load_pretrained_featurizers(vlm: PrismaticVLM, source: Path) -> None:
    """Fill the vision featurizers with timm's pretrained weights from the local Hugging Face cache (no download)."""
    load_pretrained_vision(vlm.vision_backbone, source)


def load_pretrained_vision(vision: VisionBackbone, source: Path) -> None:
    """`load_pretrained_featurizers` for a vision backbone on its own (tiny featurizers keep their seeded init)."""
    if vision.identifier.startswith("tiny-"):
        logger.warning("%s has no vision_backbone weights; tiny featurizers keep their seeded initialization.", source)
        return
    for key, spec in vision.spec.featurizers.items():
        pretrained_cfg = timm.models.get_pretrained_cfg(spec.timm_id)
        filename = pretrained_cfg.hf_hub_filename or "model.safetensors"
        cached = try_to_load_from_cache(pretrained_cfg.hf_hub_id, filename)
        if not isinstance(cached, str):
            raise FileNotFoundError(
                f"{source} holds no vision_backbone weights, and timm's pretrained weights for {spec.timm_id!r} are not "
                f"in the local Hugging Face cache. Fix: `huggingface-cli download {pretrained_cfg.hf_hub_id} "
                f"{filename}` once, or load a checkpoint that includes vision_backbone.")
        pretrained = timm.create_model(spec.timm_id, pretrained=True, pretrained_cfg_overlay={"file": cached},
                                       num_classes=0, img_size=vision.spec.image_size, **spec.overrides)
        getattr(vision, vision.featurizer_name(key)).load_state_dict(pretrained.state_dict(), strict=True)


def find_run_dir(model_id_or_path: str | Path, model_zoo_dir: str | Path | None = None) -> Path | None:
    """A run directory path as given, or `<zoo>/<model_id>` in the model zoo (`$VLA_TRAIN_MODEL_ZOO`), or None."""
    path = Path(model_id_or_path)
    if path.is_dir():
        return path
    zoo = model_zoo_dir or os.environ.get(MODEL_ZOO_ENV)
    if zoo is not None and (Path(zoo) / str(model_id_or_path)).is_dir():
        return Path(zoo) / str(model_id_or_path)
    return None


def resolve_base_vlm(model_id_or_path: str | Path,
                     model_zoo_dir: str | Path | None = None) -> tuple[ModelConfig, Path | None]:
    """`(model config, run directory)` of a base VLM: a run directory (given, or `<zoo>/<id>`), or `(its registered
    config, None)` for a tiny registry id, which builds from its seeded initialization. A full-size id without a
    local run directory is an error that says where to put one."""
    run_dir = find_run_dir(model_id_or_path, model_zoo_dir)
    if run_dir is not None:
        return read_model_config(run_dir), run_dir
    model_id = str(model_id_or_path)
    if model_id not in ModelConfig.get_known_choices():
        raise FileNotFoundError(
            f"{model_id!r} is neither a run directory nor a registered model id "
            f"(registered: {sorted(ModelConfig.get_known_choices())}).")
    model_cfg = ModelConfig.get_choice_class(model_id)()
    if not model_cfg.llm_backbone_id.startswith("tiny-"):
        raise FileNotFoundError(
            f"No local run directory for {model_id!r}. Download its Prismatic checkpoint once (config.json and "
            f"checkpoints/latest-checkpoint.pt) into <zoo>/{model_id}/ and pass model_zoo_dir or set "
            f"${MODEL_ZOO_ENV}=<zoo>, or pass the run directory path.")
    return model_cfg, None


def checkpoint_path(run_dir: Path, checkpoint: str | Path | None = None) -> Path:
    """`checkpoint`, or the run directory's `checkpoints/latest-checkpoint.pt`."""
    return Path(checkpoint) if checkpoint is not None else Path(run_dir) / CHECKPOINT_SUBDIR / LATEST_CHECKPOINT


def read_checkpoint(ckpt_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The module state dicts `{"projector": sd, "llm_backbone": sd[, "vision_backbone": sd]}` of a Prismatic
    checkpoint, memory-mapped (`torch.load(mmap=True)`, MAP_PRIVATE: nothing is read until a tensor is used). A
    missing, unreadable or malformed file is an error naming the path (and the missing key)."""
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"Checkpoint {ckpt_path} does not exist (a run directory needs "
                                f"{CHECKPOINT_SUBDIR}/{LATEST_CHECKPOINT}).")
    try:
        with torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE):
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:  # torch's zip reader names no path
        raise ValueError(f"{ckpt_path} is not a readable torch checkpoint ({str(error).splitlines()[0]}): it is "
                         "truncated or corrupt. Fix: use another checkpoint of the run (or copy it again).") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{ckpt_path} is not a Prismatic checkpoint: expected a dict with a 'model' dict.")
    modules = state["model"]
    for key in REQUIRED_MODULE_KEYS:
        if key not in modules:
            raise ValueError(f"{ckpt_path} lacks the required key 'model.{key}' (has {sorted(modules)}).")
    return modules


def load_base_vlm(
    model_id_or_path: str | Path,
    *,
    vla: bool = False,
    norm_stats: NormStats | None = None,
    llm_hf_dir: str | Path | None = None,
    model_zoo_dir: str | Path | None = None,
    inference_mode: bool = False,
) -> PrismaticVLM:
    """Load a base VLM in FP32 from a run directory, or from a registry id.

    A registry id resolves to `<model_zoo_dir>/<id>` when that run directory exists; tiny ids build from their
    seeded initialization; a full-size id without a local run directory is an error that says where to put one.
    """
    model_cfg, run_dir = resolve_base_vlm(model_id_or_path, model_zoo_dir)
    if run_dir is None:
        vlm = build_vlm(model_cfg, vla=vla, norm_stats=norm_stats, llm_hf_dir=llm_hf_dir,
                        inference_mode=inference_mode)
    else:
        vlm = load_run_dir(run_dir, vla=vla, norm_stats=norm_stats, llm_hf_dir=llm_hf_dir,
                           inference_mode=inference_mode)
    check_all_fp32(vlm)
    return vlm


def to_model_keys(vlm: PrismaticVLM, modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's `{module key: state dict}` with every tensor a base VLM checkpoint holds under another key
    (`vlm.base_checkpoint_key`, e.g. FiLM's wrapped ViT blocks) renamed to the model's key."""
    renamed = {key: dict(state) for key, state in modules.items()}
    for full_key in vlm.state_dict(keep_vars=True):
        key, _, name = full_key.partition(".")
        base_key, _, base_name = vlm.base_checkpoint_key(full_key).partition(".")
        state = renamed.get(key)
        if full_key != f"{base_key}.{base_name}" and state is not None and name not in state and base_name in state:
            state[name] = state.pop(base_name)
    return renamed


def added_keys_missing(vlm: PrismaticVLM, modules: dict[str, dict[str, torch.Tensor]]) -> set[str]:
    """The model's keys a checkpoint's (renamed) `modules` lack that `vlm.added_state()` initializes; computing the
    added state (heads built on the CPU) only when some key is missing."""
    missing = {key for key in vlm.state_dict(keep_vars=True)
               if key.partition(".")[2] not in modules.get(key.partition(".")[0], {})}
    return missing & vlm.added_state().keys() if missing else set()


def load_run_dir(run_dir: Path, *, vla: bool = False, norm_stats: NormStats | None = None,
                 llm_hf_dir: str | Path | None = None, inference_mode: bool = False,
                 checkpoint: str | Path | None = None, policy: PolicyConfig | None = None) -> PrismaticVLM:
    """Build the run directory's model (its policy's: `config.json` `vla.policy`, or `policy`) and load
    `checkpoint` (default: its latest-checkpoint.pt) in FP32. Policy modules the checkpoint lacks (a base VLM's)
    keep their seeded initialization."""
    model_cfg = read_model_config(run_dir)
    ckpt_path = checkpoint_path(run_dir, checkpoint)
    policy = policy or read_policy_config(run_dir)
    vlm = policy.build_model(build_vlm(model_cfg, vla=vla, norm_stats=norm_stats, llm_hf_dir=llm_hf_dir,
                                       inference_mode=inference_mode))
    modules = to_model_keys(vlm, read_checkpoint(ckpt_path))
    added = added_keys_missing(vlm, modules)
    for key in vlm.all_module_keys:
        if key in modules:
            module = getattr(vlm, key)
            kept = {name for name in module.state_dict() if f"{key}.{name}" in added and name not in modules[key]}
            load_module_state(module, modules[key], key, ckpt_path, keep=kept)
    if "vision_backbone" not in modules:
        load_pretrained_featurizers(vlm, ckpt_path)
    vlm.float()
    logger.info("Loaded %s from %s", model_cfg.model_id, ckpt_path)
    return vlm


def make_base_vlm_run_dir(model_cfg: ModelConfig, run_dir: Path, *, llm_hf_dir: Path | None = None,
                          init_seed: int = 7, overwrite: bool = False) -> Path:
    """Build `model_cfg` in FP32, save it as a run directory, reload it and check the logits match exactly."""
    ckpt = run_dir / CHECKPOINT_SUBDIR / LATEST_CHECKPOINT
    if ckpt.exists() and not overwrite:
        raise FileExistsError(f"{ckpt} exists; pass --overwrite true to replace it or choose another --run_dir.")
    vlm = build_vlm(model_cfg, llm_hf_dir=llm_hf_dir, init_seed=init_seed)
    save_base_vlm(vlm, model_cfg, run_dir)
    reloaded = load_base_vlm(run_dir, llm_hf_dir=llm_hf_dir)
    tokenizer = vlm.llm_backbone.get_tokenizer()
    input_ids = torch.tensor([tokenizer("In: What action should the robot take to wave?\nOut: ").input_ids])
    size = vlm.vision_backbone.spec.image_size
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    pixel_values = {k: pixels for k in vlm.vision_backbone.keys} if vlm.vision_backbone.is_fused else pixels
    with torch.no_grad():
        same = torch.equal(vlm(input_ids=input_ids, pixel_values=pixel_values).logits,
                           reloaded(input_ids=input_ids, pixel_values=pixel_values).logits)
    if not same:
        raise RuntimeError(f"Reloading {run_dir} did not reproduce the saved model's logits.")
    total = sum(p.numel() for p in reloaded.parameters())
    logger.info("Wrote base VLM %s to %s (%.3fM parameters, all FP32); reload reproduces its logits exactly.",
                model_cfg.model_id, run_dir, total / 1e6)
    return ckpt
