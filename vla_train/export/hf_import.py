"""Import an OpenVLA-format Hugging Face directory as a Prismatic training run directory (for fine-tuning).

Input: the layout of the released `openvla-7b` (or of `export_hf`): `config.json` with `vision_backbone_id`,
`llm_backbone_id`, `arch_specifier`, `image_resize_strategy`, `llm_max_length`, `norm_stats`, and safetensors weights
(`model.safetensors`, or shards listed in `model.safetensors.index.json`) in the reference HF key layout.

The LLM's architecture comes from `text_config` (sizes, `rms_norm_eps`, vocabulary, ...; read as the remote code
reads it), not from the `llm_backbone_id` registry entry, which gives the family, tokenizer and prompt format: an
export of the imported run writes the same `text_config` and computes the same logits.

Output (`import_hf(hf_dir, out_dir)`), what `train.py --pretrained_checkpoint <...>.pt --is_resume false` reads:
- `config.json` with a `vla` section whose `base_vlm` is the registered ModelConfig id that builds exactly this model,
  or, when none does, a base-VLM run directory written to `out_dir/base_vlm` (its `config.json` "model" section,
  with the `text_config` architecture as `llm_config`, and `checkpoints/latest-checkpoint.pt` linked to the imported
  weights);
- `dataset_statistics.json` (the config's `norm_stats`);
- `checkpoints/step-000000-epoch-00-loss=inf.pt` (`{"model": {"vision_backbone", "projector", "llm_backbone"}}` in
  FP32) and `checkpoints/latest-checkpoint.pt` (a hard link, else a copy).
Every check runs before the first write, so a failed import leaves nothing behind.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vla_train.atomic_io import atomic_torch_save, atomic_write_json
from vla_train.config.model import ModelConfig, model_config_from_fields, model_config_section
from vla_train.config.policy import policy_section
from vla_train.export.hf import DATASET_STATISTICS, export_text_config, text_config_as_written
from vla_train.export.keys import MODULE_KEYS, hf_to_native
from vla_train.export.oft_import import has_oft_files, oft_modules
from vla_train.export.vla_adapter_files import ACTION_QUERIES_KEY, vla_adapter_modules
from vla_train.log import logger
from vla_train.models.build import build_vlm
from vla_train.models.image_transforms import validate_resize_strategy
from vla_train.models.llm import (
    LLMBackbone,
    architecture_dict,
    architecture_differences,
    build_llm_config,
    get_llm_backbone_spec,
)
from vla_train.models.projector import projector_kind
from vla_train.models.run_dir import CHECKPOINT_SUBDIR, LATEST_CHECKPOINT, check_state_fits
from vla_train.models.vision import get_vision_backbone_spec
from vla_train.models.vlm import PrismaticVLM
from vla_train.training.checkpoint_io import atomic_link_or_copy, checkpoint_name

REQUIRED_FIELDS = ("vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy", "norm_stats")
IDENTITY_FIELDS = ("vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy",
                   "llm_max_length")
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BASE_VLM_SUBDIR = "base_vlm"


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """`config.json` of an OpenVLA-format directory, checked for the fields the import needs."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Fix: pass --hf_dir an OpenVLA-format Hugging Face directory "
                                "(config.json, safetensors weights), e.g. a download of openvla/openvla-7b.")
    config = json.loads(path.read_text())
    missing = [field for field in REQUIRED_FIELDS if field not in config]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not an OpenVLA config (model_type={config.get('model_type')!r}).")
    config.setdefault("llm_max_length", 2048)
    context = f"{path}: "
    for field, check in (("vision_backbone_id", get_vision_backbone_spec), ("llm_backbone_id", get_llm_backbone_spec),
                         ("arch_specifier", projector_kind), ("image_resize_strategy", validate_resize_strategy)):
        try:
            check(config[field])
        except ValueError as error:
            raise ValueError(f"{context}{field}: {error} Fix: register it in vla_train (models/vision.py, "
                             "models/llm.py) or import a model this project supports.") from error
    if not isinstance(config["norm_stats"], dict) or not config["norm_stats"]:
        raise ValueError(f"{context}norm_stats is empty: an OpenVLA model needs its action statistics.")
    return config


def imported_llm_config(config: dict[str, Any], llm_backbone_id: str) -> dict[str, Any] | None:
    """The LLM architecture of an OpenVLA config: its `text_config` read as the remote code reads it (the family's
    config class fills in defaults), as JSON values without save/run-time keys; None without a `text_config`."""
    text_config = config.get("text_config")
    if text_config is None:
        logger.warning("config.json has no text_config: the LLM takes the registry architecture of %s.",
                       llm_backbone_id)
        return None
    if not isinstance(text_config, dict):
        raise ValueError(f"text_config must be a JSON object (an LLM's Hugging Face config), got {text_config!r}.")
    return architecture_dict(build_llm_config(get_llm_backbone_spec(llm_backbone_id), text_config, "text_config"))


def written_text_config(model_cfg: ModelConfig) -> dict[str, Any]:
    """The architecture keys of the `text_config` an export of `model_cfg` writes (its LLM built on the meta device)."""
    with torch.device("meta"):
        llm = LLMBackbone.from_config(model_cfg.llm_backbone_id, model_cfg.llm_max_length, inference_mode=True,
                                      llm_config=model_cfg.llm_config)
    return architecture_dict(text_config_as_written(export_text_config(llm.llm.config)))


def match_model_config(config: dict[str, Any]) -> tuple[ModelConfig, bool]:
    """`(model_cfg, registered)`. `registered`: a registered ModelConfig (the config's own `model_id` first) has the
    config's identifying fields and builds the LLM its `text_config` describes. Otherwise a ModelConfig with those
    fields and `llm_config` (the `text_config`'s architecture): the registered one of `model_id` modified, or a
    `CustomModelConfig` (`model_id`, else `hf-<vision>+<llm>`)."""
    wanted = {field: config[field] for field in IDENTITY_FIELDS}
    llm_config = imported_llm_config(config, config["llm_backbone_id"])
    known = sorted(ModelConfig.get_known_choices())
    preferred = [config["model_id"]] if config.get("model_id") in known else []
    for model_id in preferred + known:
        candidate = ModelConfig.get_choice_class(model_id)()
        if all(getattr(candidate, field) == value for field, value in wanted.items()):
            if llm_config is None:
                return candidate, True
            custom = dataclasses.replace(candidate, llm_config=llm_config)
            if written_text_config(custom) == written_text_config(candidate):
                return candidate, True
            return custom, False
    model_id = config.get("model_id") or f"hf-{config['vision_backbone_id']}+{config['llm_backbone_id']}"
    return model_config_from_fields({"model_id": model_id, **wanted, "llm_config": llm_config}), False


def check_text_config_survives(config: dict[str, Any], llm: LLMBackbone, source: Path) -> None:
    """Raise unless an export of `llm` writes every architecture value of the config's `text_config` unchanged.

    Keys the installed transformers drops when it reads the config (e.g. generation defaults and a null
    `rope_scaling` in a config written by transformers 4.x) are not architecture there, and are not compared."""
    if config.get("text_config") is None:
        return
    as_read = text_config_as_written(export_text_config(build_llm_config(llm.spec, config["text_config"])))
    expected = {k: v for k, v in architecture_dict(config["text_config"]).items() if k in as_read}
    actual = architecture_dict(text_config_as_written(export_text_config(llm.llm.config)))
    differences = architecture_differences(expected, actual)
    if differences:
        raise ValueError(
            f"{source}: text_config would not survive the import (config.json vs the LLM vla_train builds with the "
            f"tokenizer of llm_backbone_id={llm.identifier!r}): {'; '.join(differences[:8])}. Fix: correct these "
            "text_config values (vocab_size must hold that tokenizer, padded to a multiple of 64, and pad_token_id "
            "be its pad id; rope_theta must equal rope_parameters.rope_theta), or set the llm_backbone_id whose "
            "tokenizer the model uses.")


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`, in FP32 (the
    training master dtype; converted shard by shard, so a bf16 7B model peaks at its FP32 size plus one shard)."""
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / SAFETENSORS).is_file():
        shards = [SAFETENSORS]
    else:
        found = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        raise FileNotFoundError(f"{hf_dir} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX} (weight files: "
                                f"{found or 'none'}). Fix: save the model with safe_serialization=True.")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (hf_dir / shard).is_file():
            raise FileNotFoundError(f"{index} names the shard {shard}, which is missing from {hf_dir}.")
        state.update({key: tensor.to(torch.float32) for key, tensor in load_file(hf_dir / shard).items()})
    return state


def to_native_modules(state: dict[str, torch.Tensor], vlm: PrismaticVLM,
                      source: Path) -> dict[str, dict[str, torch.Tensor]]:
    """HF tensors -> the three native module state dicts, checked key by key and shape by shape against `vlm`."""
    modules = hf_to_native(state, vlm.vision_backbone.keys)
    llm = modules["llm_backbone"]
    # A tied head is saved once (transformers drops the tied copy); the native checkpoint stores both names.
    if vlm.llm_backbone.llm.config.tie_word_embeddings and "llm.lm_head.weight" not in llm and \
            "llm.model.embed_tokens.weight" in llm:
        llm["llm.lm_head.weight"] = llm["llm.model.embed_tokens.weight"]
    for key in MODULE_KEYS:
        check_state_fits(getattr(vlm, key), modules[key], key, source)
    return modules


def write_base_vlm_dir(model_cfg: ModelConfig, base_dir: Path, checkpoint: Path) -> None:
    """A base-VLM run directory (`config.json` "model" section) whose latest checkpoint is the imported one."""
    atomic_write_json(base_dir / "config.json", {"model": model_config_section(model_cfg)})
    (base_dir / CHECKPOINT_SUBDIR).mkdir(parents=True, exist_ok=True)
    atomic_link_or_copy(checkpoint, base_dir / CHECKPOINT_SUBDIR / LATEST_CHECKPOINT)


def check_llm_sizes(state: dict[str, torch.Tensor], llm: LLMBackbone, source: Path) -> None:
    """Raise, naming the `text_config` values, when the LLM it describes cannot hold the weights' embedding
    (`[vocab_size, hidden_size]`) or decoder layers (`num_hidden_layers`)."""
    config, found = llm.llm.config, []
    embed = state.get("language_model.model.embed_tokens.weight")
    if embed is not None and tuple(embed.shape) != (config.vocab_size, config.hidden_size):
        found.append(f"vocab_size={config.vocab_size} and hidden_size={config.hidden_size}, but "
                     f"language_model.model.embed_tokens.weight is {tuple(embed.shape)}")
    layers = {key.split(".")[3] for key in state if key.startswith("language_model.model.layers.")}
    if layers and len(layers) != config.num_hidden_layers:
        found.append(f"num_hidden_layers={config.num_hidden_layers}, but the weights hold {len(layers)} layers")
    if found:
        raise ValueError(f"{source}: the LLM of text_config (read with transformers' defaults for what it leaves "
                         f"out) does not fit the weights: {'; '.join(found)}. Fix: write the LLM's full Hugging Face "
                         "config (sizes, rms_norm_eps, vocab_size, ...) as text_config in config.json.")


def prepare_import(hf_dir: Path) -> tuple[dict[str, Any], ModelConfig, bool, dict[str, dict[str, torch.Tensor]],
                                           torch.Tensor | None]:
    """Every check of an import, before anything is written: `(hf config, model_cfg, registered, native modules,
    VLA-Adapter's ActionQueries or None)`."""
    config = read_hf_config(hf_dir)
    try:
        model_cfg, registered = match_model_config(config)
    except ValueError as error:
        raise ValueError(f"{hf_dir / 'config.json'}: {error}") from error
    with torch.device("meta"):
        vlm = build_vlm(model_cfg, inference_mode=True)
    check_text_config_survives(config, vlm.llm_backbone, hf_dir / "config.json")
    state = read_hf_weights(hf_dir)
    action_queries = state.pop(ACTION_QUERIES_KEY, None)  # VLA-Adapter's merged model holds them beside the VLM
    check_llm_sizes(state, vlm.llm_backbone, hf_dir / "config.json")
    modules = to_native_modules(state, vlm, hf_dir)
    model_config_section(model_cfg)  # encodable: fails here rather than after the checkpoint is written
    return config, model_cfg, registered, modules, action_queries


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, vla_id: str | None = None, overwrite: bool = False,
              chunk_length: int | None = None, cameras: list[str] | None = None,
              oft_step: int | str | None = None) -> Path:
    """Write a training run directory for `hf_dir`'s weights and statistics; returns its checkpoint `.pt` path.

    A directory with OpenVLA-OFT's files (`action_head--*_checkpoint.pt`, ...) imports as an `oft` policy run
    (`export/oft_import.py`: `chunk_length` and `cameras` required, `oft_step` default the highest); one whose weights
    hold `action_queries.weight` as a `vla-adapter` run (`export/vla_adapter_files.py`, the same options).
    Every check (config, LLM architecture, weights) runs before the first write: a failed import leaves no files.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    checkpoint = out_dir / CHECKPOINT_SUBDIR / f"{checkpoint_name(0, 0, None)}.pt"
    if checkpoint.exists() and not overwrite:
        raise FileExistsError(f"{checkpoint} exists. Fix: pass --overwrite true or another --out_dir.")
    config, model_cfg, registered, modules, action_queries = prepare_import(hf_dir)
    policy = None
    if action_queries is not None:
        adapter_policy, adapter = vla_adapter_modules(hf_dir, model_cfg, action_queries, chunk_length, cameras,
                                                      oft_step)
        modules, policy = {**modules, **adapter}, policy_section(adapter_policy)
    elif has_oft_files(hf_dir):
        oft_policy, oft = oft_modules(hf_dir, model_cfg, chunk_length, cameras, oft_step)
        modules, policy = {**modules, **oft}, policy_section(oft_policy)

    atomic_torch_save({"model": modules}, checkpoint)
    atomic_link_or_copy(checkpoint, checkpoint.parent / LATEST_CHECKPOINT)
    if registered:
        base_vlm = model_cfg.model_id
    else:
        base_dir = (out_dir / BASE_VLM_SUBDIR).resolve()
        write_base_vlm_dir(model_cfg, base_dir, checkpoint)
        base_vlm = str(base_dir)
    vla_id = vla_id or hf_dir.resolve().name
    vla = {"type": vla_id, "vla_id": vla_id, "base_vlm": base_vlm, **({"policy": policy} if policy else {})}
    atomic_write_json(out_dir / "config.json", {
        "vla": vla,
        "imported_from": {"hf_dir": str(hf_dir.resolve()), "model_type": config.get("model_type"),
                          "transformers_version": config.get("transformers_version")}})
    atomic_write_json(out_dir / DATASET_STATISTICS, config["norm_stats"])
    logger.info("Imported %s as %s (base VLM %s); fine-tune with --pretrained_checkpoint %s --is_resume false",
                hf_dir, out_dir, base_vlm, checkpoint)
    return checkpoint
