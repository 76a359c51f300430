"""LoRA on a (policy) VLM with peft, before FSDP2 (`fully_shard` after peft: each adapter is sharded like any
parameter; peft after `fully_shard` would see local shard shapes, facts: policies_facts.md).

`apply_lora(model, config)` injects peft LoRA layers in place (`peft.inject_adapter_in_model`: no `PeftModel`
wrapper, so the model's own keys stay, each adapted Linear's weight moving to `<name>.base_layer.weight` beside
`<name>.lora_A.default.weight [r, in]` and `<name>.lora_B.default.weight [out, r]`). Targets: every `nn.Linear` of the
vision backbone, projector and LLM that the forward reaches (not the ViT's never-run last block), except the LM head
(as peft's "all-linear") and what the policy trains in full (heads, projectors, FiLM).

`config.modules` names the base modules that get adapters (default all three), `config.full_modules` those that train
in full beside them (`models/freezing.py`), `config.rank_pattern` per-layer ranks (peft's, with alphas scaled so that
every adapter has the scale alpha / r: one scaling merges them all).

Checkpoints: training checkpoints hold the adapted model (exact resume); a consolidated `.pt` holds the merged
weights (`merge_lora_state`: W + alpha/r * B @ A under the plain keys), which every loader reads without peft.
"""

import math

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from vla_train.config.lora import LoRAConfig
from vla_train.models.vlm import ALL_MODULE_KEYS, PrismaticVLM

LORA_INIT_SEED = 23  # the adapters' init seed: identical on every rank, independent of the device
ADAPTER = "default"  # peft's adapter name
_A, _B, _BASE = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight", ".base_layer."


def lora_target_names(model: PrismaticVLM, config: LoRAConfig) -> list[str]:
    """Full names of the `nn.Linear` modules to adapt (module docstring), in module order."""
    head = model.llm_backbone.llm.get_output_embeddings()  # peft's "all-linear" leaves the output layer out
    excluded = {id(p) for p in (*model.always_trainable(), *model.unused_parameters(), *head.parameters())}
    excluded |= {id(p) for module in model.vision_backbone.unused_modules() for p in module.parameters()}
    suffixes = config.target_suffixes()
    names = []
    for key in (key for key in ALL_MODULE_KEYS if key in config.modules):
        for name, module in getattr(model, key).named_modules():
            full = f"{key}.{name}"
            if not isinstance(module, nn.Linear) or any(id(p) in excluded for p in module.parameters()):
                continue
            if suffixes is None or any(full == s or full.endswith("." + s) for s in suffixes):
                names.append(full)
    return names


def apply_lora(model: PrismaticVLM, config: LoRAConfig) -> list[str]:
    """Inject LoRA adapters in place (on any device, meta included; call before parallelizing) and record `config`
    as `model.lora`; returns the adapted module names. A target list that matches nothing is an error."""
    if model.lora is not None:
        raise ValueError("The model already has LoRA adapters.")
    names = lora_target_names(model, config)
    if not names:
        raise ValueError(f"--vla.lora.targets {config.targets!r} matches no linear layer of the model's vision "
                         "backbone, projector or LLM. Fix: pass all-linear or suffixes such as q_proj,v_proj.")
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=names, init_lora_weights="gaussian" if config.init == "gaussian" else True,
                             rank_pattern=dict(config.rank_pattern), alpha_pattern=config.alpha_pattern())
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    model.lora = config
    return names


def is_lora_key(key: str) -> bool:
    return _A[:-len(".weight")] in key or _B[:-len(".weight")] in key


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [param for name, param in model.named_parameters() if is_lora_key(name)]


def lora_base_key(key: str) -> str:
    """Where a model without adapters holds `key` (`<name>.base_layer.weight` -> `<name>.weight`)."""
    return key.replace(_BASE, ".")


def lora_initial_state(model: nn.Module, config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The adapters' initial values (CPU, FP32) in state-dict order: lora_A gaussian (std 1/r with the adapter's own r,
    peft's "gaussian")
    or kaiming-uniform (peft's default), lora_B zeros (so the adapted model starts equal to the base). Drawn from
    one generator seeded with `LORA_INIT_SEED`, so every rank and every device gets the same values (peft's own init
    runs on the model's device, the meta device when training builds it)."""
    generator = torch.Generator().manual_seed(LORA_INIT_SEED)
    state = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.endswith(_A):
            values = torch.empty(tensor.shape)
            if config.init == "gaussian":
                values.normal_(0.0, 1.0 / tensor.shape[0], generator=generator)  # lora_A is [r, in]
            else:  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1.0 / math.sqrt(tensor.shape[1])
                values.uniform_(-bound, bound, generator=generator)
            state[key] = values
        elif key.endswith(_B):
            state[key] = torch.zeros(tensor.shape)
    return state


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A full state dict of an adapted model -> the merged model's (plain keys): `W + scaling * B @ A` in FP32 per
    adapted Linear (whatever the base's dtype), `base_layer` biases renamed. Hand-rolled because peft merges modules
    in place, and a consolidated checkpoint only has the gathered state dict on rank 0's CPU."""
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if is_lora_key(key):
            continue
        if key.endswith(_BASE + "weight"):
            prefix = key[: -len(_BASE + "weight")]
            update = state[prefix + _B].float() @ state[prefix + _A].float()
            merged[lora_base_key(key)] = tensor.float() + scaling * update
        else:
            merged[lora_base_key(key)] = tensor
    return merged
