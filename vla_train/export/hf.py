"""Export a training run's checkpoint as a Hugging Face OpenVLA directory (loadable with transformers alone).

`export_hf(run_dir, out_dir)` writes (facts §10.2, with the reference's defects fixed):
- `config.json`: `OpenVLAConfig` fields, `norm_stats` from the run's `dataset_statistics.json`, the LLM's *real*
  `text_config` (the reference wrote a default LlamaConfig, §12 item 41), the action-token layout and prompt suffix,
  and an `auto_map` for AutoConfig, AutoModelForImageTextToText (transformers 5), AutoModelForVision2Seq (4.x),
  AutoImageProcessor and AutoProcessor;
- `model*.safetensors` with the reference HF key layout (see `vla_train.export.keys`), FP32 by default;
- the tokenizer, `preprocessor_config.json`, `processor_config.json`, `dataset_statistics.json`;
- the remote-code modules of `vla_train/export/hf_remote/`.
An OpenVLA-OFT run (`vla.policy.type oft`) exports as `OpenVLAOFTConfig` / `OpenVLAOFTForActionPrediction`
(`hf_remote/configuration_oft.py`, `modeling_oft.py`, copied only into OFT exports): config.json gains the `oft`
policy entry and its `norm_stats` the proprio statistics; the heads and projectors keep their module names, FiLM'd ViT
blocks map as `oft_keys` maps them. What the remote code cannot reproduce (another DDIM setting, missing proprio
statistics, an attention without dense masks, a checkpoint without trained heads) is refused with a ValueError.
A VLA-Adapter run (`vla-adapter`) exports as VLA-Adapter releases its merged models: the OpenVLA layout plus
`action_queries.weight`, with `action_head--<step>_checkpoint.pt` and `proprio_projector--...` beside it
(`export/vla_adapter_files.py`), the directory VLA-Adapter's evaluation code and `import_hf` load.
The model is assembled on the meta device and filled with the checkpoint's tensors (`assign=True`), so a 7B export
needs about one copy of the weights in memory and no random initialization.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import timm
import torch
from transformers import PretrainedConfig

from vla_train.atomic_io import atomic_write_json
from vla_train.config.model import ModelConfig
from vla_train.config.policy import OFTPolicyConfig, Pi0PolicyConfig, VLAAdapterPolicyConfig, read_policy_config
from vla_train.config.train import checkpoint_step_epoch
from vla_train.export.hf_remote import OFT_REMOTE_MODULES, REMOTE_MODULES
from vla_train.export.hf_remote.configuration_oft import SUPPORTED_DDIM, OpenVLAOFTConfig, check_oft_settings
from vla_train.export.hf_remote.configuration_prismatic import OpenVLAConfig
from vla_train.export.hf_remote.modeling_prismatic import OpenVLAForActionPrediction, PrismaticPreTrainedModel
from vla_train.export.hf_remote.processing_prismatic import PrismaticImageProcessor, PrismaticProcessor
from vla_train.export.keys import MODULE_KEYS, native_to_hf
from vla_train.export.pi0_run import export_pi0_run
from vla_train.export.vla_adapter_files import add_action_queries, step_of, write_vla_adapter_files
from vla_train.log import logger
from vla_train.models.build import build_vlm
from vla_train.models.llm import PAD_TO_MULTIPLE_OF
from vla_train.models.openvla import OpenVLA
from vla_train.models.prompts import VLA_QUESTION_TEMPLATE, PromptBuilder
from vla_train.models.run_dir import CHECKPOINT_SUBDIR, LATEST_CHECKPOINT, check_state_fits, read_model_config
from vla_train.models.vision import VisionBackbone
from vla_train.training.checkpoint_discovery import CheckpointDiscovery
from vla_train.training.checkpoint_io import consolidate_checkpoint, parse_checkpoint_name

REMOTE_DIR = Path(__file__).with_name("hf_remote")
DATASET_STATISTICS = "dataset_statistics.json"
PROPRIO_STATS = ("q01", "q99", "min", "max")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
AUTO_MAP = {
    "AutoConfig": "configuration_prismatic.OpenVLAConfig",
    "AutoModelForImageTextToText": "modeling_prismatic.OpenVLAForActionPrediction",
    "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
    "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
    "AutoProcessor": "processing_prismatic.PrismaticProcessor",
}
OFT_AUTO_MAP = {**AUTO_MAP, "AutoConfig": "configuration_oft.OpenVLAOFTConfig",
                "AutoModelForImageTextToText": "modeling_oft.OpenVLAOFTForActionPrediction",
                "AutoModelForVision2Seq": "modeling_oft.OpenVLAOFTForActionPrediction"}
PROCESSOR_AUTO_MAP = {key: AUTO_MAP[key] for key in ("AutoImageProcessor", "AutoProcessor")}
_EXAMPLE_INSTRUCTION = "pick up the red block"
TOKENIZER_INPUT_NAMES = ("input_ids", "attention_mask")
# `from_pretrained` arguments transformers records in a tokenizer's init kwargs (and `save_pretrained` writes back):
# they describe one load on one machine, not the tokenizer.
TOKENIZER_LOAD_TIME_KEYS = ("is_local", "local_files_only", "cache_dir", "force_download", "proxies",
                            "resume_download", "token", "use_auth_token", "revision", "subfolder", "trust_remote_code",
                            "_commit_hash", "_from_auto", "name_or_path")


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The consolidated `.pt` to export: `checkpoints/latest-checkpoint.pt` (else the newest `step-*.pt`), or the
    `step-{step:06d}-*.pt` of `step`. A newer (or the requested) sharded checkpoint saved without its `.pt`
    (`--save_consolidated end|never`) is consolidated first, into its `step-....pt` next to it (FP32)."""
    checkpoints = Path(run_dir) / CHECKPOINT_SUBDIR
    sharded = CheckpointDiscovery(run_dir).complete_checkpoints()
    if step is None:
        path = checkpoints / LATEST_CHECKPOINT
        newest = sorted(checkpoints.glob("step-*.pt"), key=lambda p: parse_checkpoint_name(p.name) or (-1, -1))
        found = path if path.is_file() else newest[-1] if newest else None
        found_step = checkpoint_step_epoch(found)[0] if found is not None else None
        if sharded and (found_step is None or parse_checkpoint_name(sharded[-1].name)[0] > found_step):
            return consolidate_checkpoint(sharded[-1])
        if found is None:
            raise FileNotFoundError(f"{checkpoints} holds no checkpoint ({LATEST_CHECKPOINT}, step-*.pt or a sharded "
                                    "step-* directory): train first.")
        return found
    matches = sorted(checkpoints.glob(f"step-{step:06d}-*.pt"))
    if not matches:
        unconsolidated = [p for p in sharded if parse_checkpoint_name(p.name)[0] == step]
        if unconsolidated:
            return consolidate_checkpoint(unconsolidated[-1])
        available = sorted({p.name for p in checkpoints.glob("step-*.pt")} | {p.name for p in sharded})
        raise FileNotFoundError(f"No checkpoint for step {step} in {checkpoints}. Fix: pass --step for one of "
                                f"{available or 'none (train first)'}.")
    return matches[-1]


def read_norm_stats(run_dir: Path) -> dict[str, Any]:
    path = run_dir / DATASET_STATISTICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a VLA export needs the run's action statistics (training "
                                "writes them). Fix: pass the run directory of a VLA training run.")
    stats = json.loads(path.read_text())
    bad = [name for name, entry in stats.items() if not isinstance(entry, dict) or "q01" not in entry.get("action", {})]
    if not stats or bad:
        raise ValueError(f"{path} has no action q01/q99 statistics for {bad or 'any dataset'}.")
    return stats


def prompt_suffix_ids(prompt_builder_fn: type[PromptBuilder], tokenizer: Any) -> list[int]:
    """Ids that follow the right-stripped VLA prompt at training time (e.g. `[29871]`, the lone space, for Llama-2).

    Users (and the reference's deploy script) prompt with the stripped text (`...\\nOut:`); the model appends these.
    """
    builder = prompt_builder_fn("openvla")
    builder.add_turn("human", VLA_QUESTION_TEMPLATE.format(instruction=_EXAMPLE_INSTRUCTION))
    full = list(tokenizer(builder.generation_prompt()).input_ids)
    stripped = list(tokenizer(builder.get_prompt()).input_ids)
    if full[: len(stripped)] != stripped:
        raise ValueError(f"The stripped prompt {builder.get_prompt()!r} does not tokenize to a prefix of the training "
                         f"prompt {builder.generation_prompt()!r} ({stripped[-4:]} vs {full[-5:]}); the exported "
                         "model could not restore the training context.")
    return full[len(stripped):]


def vla_prompt_template(prompt_builder_fn: type[PromptBuilder]) -> str:
    """The prompt users pass to the processor, with `{instruction}` (lower-cased at training time) to fill in."""
    builder = prompt_builder_fn("openvla")
    builder.add_turn("human", VLA_QUESTION_TEMPLATE.format(instruction="{instruction}"))
    return builder.get_prompt()


def featurizer_settings(vision: VisionBackbone) -> list[dict[str, Any]]:
    """Per featurizer: timm id, extra timm arguments, act layer, and the image-transform parameters."""
    settings = []
    for key, spec in vision.spec.featurizers.items():
        data_config = timm.data.resolve_model_data_config(getattr(vision, vision.featurizer_name(key)))
        overrides = dict(spec.overrides)
        settings.append({
            "timm_id": spec.timm_id, "act_layer": overrides.pop("act_layer", None), "kwargs": overrides,
            "interpolation": data_config["interpolation"], "crop_pct": float(data_config["crop_pct"]),
            "mean": [float(x) for x in data_config["mean"]], "std": [float(x) for x in data_config["std"]],
            "resize_shorter_side": spec.resize_shorter_side_to_size})
    return settings


def export_text_config(llm_config: PretrainedConfig, dtype_name: str = "float32") -> dict[str, Any]:
    """The `text_config` an export carries for an LLM config (before `OpenVLAConfig` serializes it)."""
    text_config = llm_config.to_dict()
    for key in ("_name_or_path", "architectures", "transformers_version"):
        text_config.pop(key, None)
    text_config.update(use_cache=True, dtype=dtype_name)
    return text_config


def text_config_as_written(text_config: dict[str, Any]) -> dict[str, Any]:
    """`text_config` as an export's `config.json` holds it (the remote `OpenVLAConfig`'s serialization, with the
    legacy keys transformers 4.x reads), e.g. for comparing an imported directory's with what a re-export writes."""
    return json.loads(OpenVLAConfig(text_config=text_config).to_json_string())["text_config"]


def build_hf_config(vlm: OpenVLA, model_cfg: ModelConfig, norm_stats: dict[str, Any], dtype: torch.dtype,
                    config_cls: type[OpenVLAConfig] = OpenVLAConfig, **extra: Any) -> OpenVLAConfig:
    """The exported `OpenVLAConfig` of a (meta-device) native OpenVLA (or `config_cls` with `extra` fields, of a
    policy model built around one: same backbones, statistics and prompt)."""
    llm, vision = vlm.llm_backbone, vlm.vision_backbone
    tokenizer = llm.get_tokenizer()
    featurizers = featurizer_settings(vision)
    dtype_name = str(dtype).removeprefix("torch.")
    text_config = export_text_config(llm.llm.config, dtype_name)
    text_config["pad_token_id"] = tokenizer.pad_token_id
    return config_cls(
        vision_backbone_id=model_cfg.vision_backbone_id, llm_backbone_id=model_cfg.llm_backbone_id,
        arch_specifier=model_cfg.arch_specifier, use_fused_vision_backbone=vision.is_fused,
        image_resize_strategy=model_cfg.image_resize_strategy, text_config=text_config,
        hf_llm_id=llm.spec.hf_hub_path, llm_max_length=model_cfg.llm_max_length,
        pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=PAD_TO_MULTIPLE_OF,
        timm_model_ids=[f["timm_id"] for f in featurizers],
        timm_override_act_layers=[f["act_layer"] for f in featurizers],
        timm_model_kwargs=[f["kwargs"] for f in featurizers],
        image_sizes=[vision.spec.image_size] * len(featurizers), model_id=model_cfg.model_id,
        norm_stats=norm_stats, n_action_bins=vlm.action_tokenizer.n_bins,
        action_vocab_end=vlm.action_tokenizer.vocab_end,
        prompt_suffix_ids=prompt_suffix_ids(llm.prompt_builder_fn, tokenizer),
        vla_prompt_template=vla_prompt_template(llm.prompt_builder_fn),
        dtype=dtype_name, **{"architectures": ["OpenVLAForActionPrediction"], **extra})


def build_image_processor(vision: VisionBackbone) -> PrismaticImageProcessor:
    """The image processor that reproduces `vision.get_image_transform()` (stacked on the channel axis)."""
    featurizers, size = featurizer_settings(vision), vision.spec.image_size
    return PrismaticImageProcessor(
        use_fused_vision_backbone=vision.is_fused, image_resize_strategy=vision.image_resize_strategy,
        input_sizes=[[3, size, size]] * len(featurizers), interpolations=[f["interpolation"] for f in featurizers],
        means=[f["mean"] for f in featurizers], stds=[f["std"] for f in featurizers],
        crop_pcts=[f["crop_pct"] for f in featurizers],
        resize_shorter_side=[f["resize_shorter_side"] for f in featurizers])


def load_checkpoint_modules(checkpoint: Path, vlm: OpenVLA) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's three module state dicts, checked key by key and shape by shape against `vlm`."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    modules = state.get("model") if isinstance(state, dict) else None
    if not isinstance(modules, dict):
        raise ValueError(f"{checkpoint} is not a Prismatic checkpoint: expected a dict with a 'model' dict.")
    missing = [key for key in MODULE_KEYS if key not in modules]
    if missing:
        raise ValueError(f"{checkpoint} lacks {['model.' + key for key in missing]} (has {sorted(modules)}): an "
                         "export needs all three modules, as VLA training saves them.")
    for key in MODULE_KEYS:
        check_state_fits(getattr(vlm, key), modules[key], key, checkpoint)
    return modules


def save_processor(processor: PrismaticProcessor, out_dir: Path) -> None:
    """Tokenizer and processor files in the layout both transformers 5 and 4.x read.

    transformers 5 nests the image processor in `processor_config.json`; 4.x reads `preprocessor_config.json` and
    passes every other `processor_config.json` key to the processor's constructor. So: the image processor (with its
    `auto_map`) goes to `preprocessor_config.json`, and `processor_config.json` names only the class. The tokenizer
    class is recorded as `PreTrainedTokenizerFast` (transformers 5 loads any `openvla` tokenizer with its tokenizers
    backend regardless; 4.x has no `TokenizersBackend`), with `model_input_names` (4.x's `PreTrainedTokenizerFast`
    would otherwise also return `token_type_ids`) and without the settings of the load that built the tokenizer
    (`TOKENIZER_LOAD_TIME_KEYS`, e.g. `local_files_only`).
    """
    processor.save_pretrained(out_dir)
    image_processor = {**processor.image_processor.to_dict(), "image_processor_type": "PrismaticImageProcessor",
                       "processor_class": "PrismaticProcessor", "auto_map": dict(PROCESSOR_AUTO_MAP)}
    atomic_write_json(out_dir / "preprocessor_config.json", image_processor)
    atomic_write_json(out_dir / "processor_config.json",
                {"processor_class": "PrismaticProcessor", "auto_map": dict(PROCESSOR_AUTO_MAP)})
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    for key in TOKENIZER_LOAD_TIME_KEYS:
        tokenizer_config.pop(key, None)
    tokenizer_config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=list(TOKENIZER_INPUT_NAMES))
    atomic_write_json(out_dir / "tokenizer_config.json", tokenizer_config)


def oft_section(policy: OFTPolicyConfig, vlm: Any) -> dict[str, Any]:
    """The exported config's `oft` entry (`configuration_oft.py`) of a (meta-device) `OFTVLM` built by `policy`."""
    head = vlm.action_head
    mlp = head.model if policy.head == "l1" else head.noise_predictor.mlp_resnet
    section = {"head": policy.head, "chunk_length": policy.chunk_length, "action_dim": policy.action_dim,
               "proprio_dim": policy.proprio_dim, "cameras": list(policy.cameras), "film": policy.film,
               "num_diffusion_steps_inference": policy.num_diffusion_steps_inference,
               "head_hidden_dim": vlm.head_hidden_dim, "head_num_blocks": len(mlp.mlp_resnet_blocks),
               "stop_token_ids": [int(i) for i in vlm.stop_token_ids]}
    if policy.head == "diffusion":
        scheduler = dict(head.noise_scheduler.config)
        section["diffusion"] = {key: scheduler[key] for key in ("num_train_timesteps", *SUPPORTED_DDIM)}
    check_oft_settings(section)  # an unsupported scheduler setting fails here, before anything is written
    return section


def check_oft_exportable(policy: OFTPolicyConfig, vlm: Any, norm_stats: dict[str, Any]) -> None:
    """Raise a ValueError naming what an OFT export cannot carry: statistics the policy needs but lacks, or an LLM
    attention without dense bidirectional masks."""
    for name, stats in norm_stats.items():
        if len(stats["action"]["q01"]) != policy.action_dim:
            raise ValueError(f"dataset_statistics.json '{name}' has {len(stats['action']['q01'])} action dimensions; "
                             f"the OFT policy predicts action_dim={policy.action_dim}.")
        proprio = stats.get("proprio")
        if policy.proprio_dim and not (isinstance(proprio, dict) and all(k in proprio for k in PROPRIO_STATS)):
            raise ValueError(f"dataset_statistics.json '{name}' lacks proprio statistics {list(PROPRIO_STATS)}; the "
                             f"OFT policy reads proprio_dim={policy.proprio_dim} and the export normalizes it.")
        if policy.proprio_dim and len(proprio["q01"]) != policy.proprio_dim:
            raise ValueError(f"dataset_statistics.json '{name}' has {len(proprio['q01'])} proprio dimensions; the "
                             f"policy reads proprio_dim={policy.proprio_dim}.")
    attn = vlm.llm_backbone.llm.config._attn_implementation
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"OFT export: the LLM uses attn_implementation={attn!r}; the exported model needs 'sdpa' or "
                         "'eager' (dense bidirectional masks).")


def load_oft_checkpoint_modules(checkpoint: Path, vlm: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Every module of the OFT model (`vlm.all_module_keys`: backbones, projector, heads) from the checkpoint, keys
    as the model's (FiLM's wrapped blocks), checked key by key and shape by shape."""
    from vla_train.models.run_dir import to_model_keys

    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    modules = state.get("model") if isinstance(state, dict) else None
    if not isinstance(modules, dict):
        raise ValueError(f"{checkpoint} is not a Prismatic checkpoint: expected a dict with a 'model' dict.")
    modules = to_model_keys(vlm, modules)
    missing = [key for key in vlm.all_module_keys if key not in modules]
    if missing:
        raise ValueError(f"{checkpoint} lacks {['model.' + key for key in missing]} (has {sorted(modules)}): an OFT "
                         "export needs the trained heads and projectors, as OFT training saves them.")
    for key in vlm.all_module_keys:
        check_state_fits(getattr(vlm, key), modules[key], key, checkpoint)
    return modules


def build_oft_export(policy: OFTPolicyConfig, model_cfg: ModelConfig, norm_stats: dict[str, Any], checkpoint: Path,
                     dtype: torch.dtype) -> tuple[PrismaticPreTrainedModel, dict[str, torch.Tensor], Any]:
    """`(meta-device HF model, its state dict, the meta-device native OFTVLM)` of an OFT run's checkpoint."""
    from vla_train.export.hf_remote.modeling_oft import OpenVLAOFTForActionPrediction
    from vla_train.models.oft.model import NEW_MODULE_KEYS

    with torch.device("meta"):
        vlm = policy.build_model(build_vlm(model_cfg, vla=True, norm_stats=norm_stats, inference_mode=True))
    check_oft_exportable(policy, vlm, norm_stats)
    modules = load_oft_checkpoint_modules(checkpoint, vlm)
    config = build_hf_config(vlm, model_cfg, norm_stats, dtype, OpenVLAOFTConfig, oft=oft_section(policy, vlm),
                             architectures=["OpenVLAOFTForActionPrediction"])
    hf_state = native_to_hf({key: modules[key] for key in MODULE_KEYS}, vlm.vision_backbone.keys)
    hf_state |= {f"{key}.{name}": tensor for key in NEW_MODULE_KEYS if key in modules
                 for name, tensor in modules[key].items()}
    with torch.device("meta"):
        model = OpenVLAOFTForActionPrediction(config)
    return model, {key: tensor.to(dtype) for key, tensor in hf_state.items()}, vlm


def _write_hf_dir(model: PrismaticPreTrainedModel, hf_state: dict[str, torch.Tensor], auto_map: dict[str, str],
                  remote_modules: tuple[str, ...], vlm: OpenVLA, run_dir: Path, out_dir: Path, checkpoint: Path,
                  max_shard_size: str) -> None:
    """Fill the meta-device HF `model` with `hf_state` (checked key by key) and write it, the processor, the
    remote-code modules and the dataset statistics into `out_dir`."""
    check_state_fits(model, hf_state, "exported model", checkpoint)
    model.load_state_dict(hf_state, strict=True, assign=True)
    model.tie_weights()  # tied LLMs (Qwen2.5): the head shares the embedding again after `assign`
    on_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if on_meta:
        raise RuntimeError(f"Export left tensors without values: {on_meta[:8]}.")
    model.config.auto_map = dict(auto_map)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor = PrismaticProcessor(build_image_processor(vlm.vision_backbone), vlm.llm_backbone.get_tokenizer())
    save_processor(processor, out_dir)
    for name in remote_modules:
        shutil.copyfile(REMOTE_DIR / name, out_dir / name)
    shutil.copyfile(run_dir / DATASET_STATISTICS, out_dir / DATASET_STATISTICS)


def export_hf(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, dtype: str = "fp32",
              overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
    """Export `run_dir`'s checkpoint (latest, or `step`) to `out_dir` as a Hugging Face directory; returns out_dir.
    The run's policy picks the layout: `openvla` (token actions), `oft` (action chunks, `build_oft_export`),
    `vla-adapter` (the OpenVLA layout + ActionQueries, with VLA-Adapter's files beside it), `pi0` (LeRobot's π0
    layout, `export/pi0_run.py`)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}. Fix: pass --dtype one of {sorted(DTYPES)}.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty. Fix: pass --overwrite true or another --out_dir.")
    model_cfg = read_model_config(run_dir)
    policy = read_policy_config(run_dir)
    if policy.family not in ("openvla", "oft", "vla-adapter", "pi0"):
        raise ValueError(f"{run_dir} trains the {policy.family!r} policy; export_hf writes 'openvla', 'oft', "
                         "'vla-adapter' and 'pi0' policies only.")
    if isinstance(policy, Pi0PolicyConfig):  # π0's users load LeRobot's layout
        return export_pi0_run(run_dir, out_dir, find_checkpoint(run_dir, step), dtype)
    norm_stats = read_norm_stats(run_dir)
    checkpoint = find_checkpoint(run_dir, step)
    if isinstance(policy, OFTPolicyConfig):
        model, hf_state, vlm = build_oft_export(policy, model_cfg, norm_stats, checkpoint, DTYPES[dtype])
        _write_hf_dir(model, hf_state, OFT_AUTO_MAP, OFT_REMOTE_MODULES, vlm, run_dir, out_dir, checkpoint,
                      max_shard_size)
        logger.info("Exported %s (%s, OFT %s head) to %s as %s", checkpoint, model_cfg.model_id, policy.head,
                    out_dir, dtype)
        return out_dir
    with torch.device("meta"):
        vlm = build_vlm(model_cfg, vla=True, norm_stats=norm_stats, inference_mode=True)
    assert isinstance(vlm, OpenVLA)
    modules = load_checkpoint_modules(checkpoint, vlm)
    config = build_hf_config(vlm, model_cfg, norm_stats, DTYPES[dtype])
    hf_state = {key: tensor.to(DTYPES[dtype]) for key, tensor in
                native_to_hf(modules, vlm.vision_backbone.keys).items()}
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(config)
    if isinstance(policy, VLAAdapterPolicyConfig):  # VLA-Adapter's merged model: the VLM + its ActionQueries
        hf_state |= add_action_queries(model, policy, vlm, modules, checkpoint, DTYPES[dtype])
    _write_hf_dir(model, hf_state, AUTO_MAP, REMOTE_MODULES, vlm, run_dir, out_dir, checkpoint, max_shard_size)
    if isinstance(policy, VLAAdapterPolicyConfig):
        write_vla_adapter_files(modules, out_dir, step_of(checkpoint), pro=policy.block == "pro")
    logger.info("Exported %s (%s, %s policy) to %s as %s", checkpoint, model_cfg.model_id, policy.family, out_dir,
                dtype)
    return out_dir
