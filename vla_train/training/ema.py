"""An exponential moving average (EMA) of the trainable weights, sharded like them (openpi's `ema_decay`, 0.99).

`ModelEMA` keeps an FP32 shadow of every trainable parameter, made by `p.detach().clone()`: on an FSDP2 model a DTensor
on the parameter's mesh with its placements, so each rank holds and updates only its own shards (4 bytes per
trainable parameter, divided over the ranks that shard it). `update()`, after every optimizer step on every rank, is one
`torch._foreach_lerp_(shadow, params, 1 - decay)` (`shadow = decay * shadow + (1 - decay) * param`) over the local
shards: no host sync, no collective. The average starts from the weights the run starts with.

It is a `Stateful` with `SHARDED = True`: the checkpoint stores the shadows as DTensors under `ema.<key>` (the keys of
the trainable tensors under `model.<key>`), next to the model and optimizer (`checkpoint_state.training_states(...,
ema)`), and a resume restores them bit for bit. `full_state_dict()` gathers them keyed like the model's state dict
(consolidated saves write the EMA weights as the model weights, `CheckpointManager._save_consolidated`);
`swapped_in(model)` puts them into the model for an evaluation or export and restores the trained weights after.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from vla_train.log import logger
from vla_train.training.optim import canonical_name


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place ops write the DTensor), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _trainable(model: nn.Module) -> tuple[list[nn.Parameter], list[list[str]]]:
    """The distinct trainable parameters in `named_parameters` order, each with every state-dict key it has (tied
    weights: several), wrapper segments (activation checkpointing, torch.compile) removed."""
    params: list[nn.Parameter] = []
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        if id(param) not in names:
            params.append(param)
            names[id(param)] = []
        names[id(param)].append(canonical_name(name))
    return params, [names[id(param)] for param in params]


class ModelEMA(Stateful):
    """FP32 shadows of `model`'s trainable parameters (sharded as they are), averaged with `decay` per step."""

    SHARDED = True

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay = {decay} is outside (0, 1). Fix: pass --vla.ema_decay in (0, 1), e.g. 0.99.")
        params, names = _trainable(model)
        if not params:
            raise ValueError("ModelEMA: the model has no trainable parameters (check the freezing stage).")
        not_fp32 = [f"{keys[0]} ({p.dtype})" for p, keys in zip(params, names, strict=True) if p.dtype != torch.float32]
        if not_fp32:
            raise ValueError(f"ModelEMA averages FP32 master weights; trainable parameters {not_fp32[:4]} are not "
                             "FP32. Fix: keep trainable parameters in FP32 (bf16 is for compute only).")
        self.decay = float(decay)
        self.params = params
        self.names = names
        with torch.no_grad():
            self.shadow: list[torch.Tensor] = [p.detach().clone() for p in params]
        local_bytes = sum(_local(s).numel() * s.element_size() for s in self.shadow)
        logger.info("EMA (decay %g) of %d trainable tensors (%d params): %.1f MiB of FP32 shadow shards on this rank",
                    self.decay, len(params), sum(p.numel() for p in params), local_bytes / 2**20)

    @torch.no_grad()
    def update(self) -> None:
        """`shadow = decay * shadow + (1 - decay) * param` for every trainable tensor; call after `optimizer.step()`
        on every rank. Local shards only (the shadows are placed as the parameters): no sync, no collective."""
        torch._foreach_lerp_([_local(s) for s in self.shadow], [_local(p) for p in self.params], 1.0 - self.decay)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        """`{state-dict key: shadow}` for every key of a trainable parameter in the model's state dict (a tied weight
        under each of its keys, as the model's checkpoint holds it); DTensors on a sharded model, the live tensors."""
        return {key: shadow for keys, shadow in zip(self.names, self.shadow, strict=True) for key in keys}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy `state_dict` (keys and shapes as `state_dict()`'s) into the shadows; DCP's load fills the shadows in
        place, then this is a no-op."""
        expected = self.state_dict()
        missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(f"EMA state mismatch: missing {missing[:4]}, unexpected {unexpected[:4]} (of "
                             f"{len(expected)} trainable tensors). Fix: load an EMA saved with the same trainable "
                             "parameters (freezing stage, LoRA, policy).")
        for keys, shadow in zip(self.names, self.shadow, strict=True):
            value = state_dict[keys[0]]  # a tied weight's keys hold the same tensor
            if value is not shadow:
                shadow.copy_(value)

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Every EMA tensor gathered (`DTensor.full_tensor()`, one tensor at a time) as a full FP32 CPU tensor under
        each of its keys in the model's state dict. Collective on a sharded model: call on every rank; with
        `rank0_only`, ranks other than 0 get `{}`."""
        keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
        full_state: dict[str, torch.Tensor] = {}
        for keys, shadow in zip(self.names, self.shadow, strict=True):
            full = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
            if keep:
                full = full.detach().to("cpu", copy=True)
                full_state.update(dict.fromkeys(keys, full))
            del full
        return full_state

    def in_full_state(self, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's full state dict (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`: rank 0's,
        `{}` elsewhere) with the EMA tensors in place of the trainable ones. Collective (`full_state_dict`)."""
        ema_state = self.full_state_dict()
        unknown = [key for key in ema_state if key not in full_state]
        if unknown:
            raise ValueError(f"EMA keys {unknown[:4]} are not in the model's state dict (keys such as "
                             f"{list(full_state)[:2]}): cannot write the EMA weights as the model weights.")
        return {key: ema_state.get(key, tensor) for key, tensor in full_state.items()}

    # ------------------------------------------------------------------------------------------ evaluation, export
    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block `model`'s trainable parameters hold the EMA weights; after it (also on an error) the
        trained weights, bit for bit. Costs one copy of this rank's trainable shards; no collective. FSDP2 modules
        are resharded on entry and exit, so that no gathered copy of the other weights is used."""
        _reshard(model)  # first: a module kept gathered after a forward lists its unsharded parameters
        params, _ = _trainable(model)
        if [id(p) for p in params] != [id(p) for p in self.params]:
            raise ValueError("swapped_in: the model's trainable parameters are not the ones this EMA averages. Fix: "
                             "pass the model the ModelEMA was built on.")
        with torch.no_grad():
            targets = [_local(p) for p in self.params]
            backup = [t.clone() for t in targets]
            torch._foreach_copy_(targets, [_local(s) for s in self.shadow])
        try:
            yield model
        finally:
            with torch.no_grad():
                _reshard(model)
                torch._foreach_copy_(targets, backup)


def _reshard(model: nn.Module) -> None:
    """Free every FSDP2 module's gathered parameters (they are re-gathered from the shards at the next forward)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
