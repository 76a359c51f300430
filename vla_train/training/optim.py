"""AdamW parameter groups, the step budget and the learning-rate schedules (facts §9.2, steps 6-7).

The decay / no-decay split looks at each parameter's ORIGINAL shape, recorded before sharding: the reference read
shapes after FSDP had flattened them, so every parameter fell into the no-decay group and weight decay was silently
never applied (facts §12 item 14). Wrapper prefixes (FSDP, activation checkpointing, torch.compile, DDP) are stripped
before shapes are looked up, so the split is the same whichever way the model is wrapped.
"""

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    get_constant_schedule,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from vla_train.config.vla import ADAMW_BETAS, ADAMW_EPS, LR_SCHEDULERS
from vla_train.log import logger

STEP_DECAY_GAMMA = 0.1  # OpenVLA-OFT's MultiStepLR gamma

# Name segments that wrappers insert into parameter names (FSDP1, activation checkpointing, torch.compile).
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter name with every wrapper segment removed (`a._checkpoint_wrapped_module.b` -> `a.b`)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def record_parameter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Canonical parameter names -> original (unsharded) shapes; call before `fully_shard`.

    FSDP2 DTensors report their global shape, so a call after `fully_shard` gives the same answer; FSDP1's flattened
    views do not, hence the guard.
    """
    shapes: dict[str, torch.Size] = {}
    for name, param in model.named_parameters():
        if "_fsdp_wrapped_module." in name or "_flat_param" in name:
            raise ValueError(f"record_parameter_shapes got an FSDP1-wrapped model (parameter {name!r}): its shapes are "
                             "flattened shards. Record the shapes before wrapping the model.")
        shapes[canonical_name(name)] = torch.Size(param.shape)
    return shapes


def _original_shape(name: str, original_shapes: dict[str, torch.Size]) -> torch.Size:
    candidates = [canonical_name(name)]
    if candidates[0].startswith("module."):  # DDP / DataParallel wrap the whole model under `module`
        candidates.append(candidates[0].removeprefix("module."))
    for candidate in candidates:
        if candidate in original_shapes:
            return original_shapes[candidate]
    known = ", ".join(sorted(original_shapes)[:5])
    raise ValueError(f"No original shape recorded for trainable parameter {name!r} (looked up {candidates}); "
                     f"call record_parameter_shapes(model) on this model before wrapping it. Known names: {known}, ...")


def split_decay_parameters(
    model: nn.Module, original_shapes: dict[str, torch.Size]
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Trainable `(name, parameter)` pairs split into (decay, no_decay).

    Decay: original `ndim >= 2` and the name does not end in `.bias`; everything else (biases, norms, scalars) is
    no-decay. Frozen parameters (`requires_grad=False`) are in neither list.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = _original_shape(name, original_shapes)
        is_decay = len(shape) >= 2 and not name.endswith(".bias")
        (decay if is_decay else no_decay).append((name, param))
    return decay, no_decay


def build_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float, original_shapes: dict[str, torch.Size],
    betas: tuple[float, float] = ADAMW_BETAS, eps: float = ADAMW_EPS,
) -> torch.optim.AdamW:
    """AdamW(`betas`, `eps`; defaults: `config.vla.ADAMW_BETAS` / `ADAMW_EPS`) over the trainable parameters: group 0
    decays with `weight_decay`, group 1 has weight decay 0.0."""
    decay, no_decay = split_decay_parameters(model, original_shapes)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: the model has no trainable parameters (check the freezing stage).")
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    betas = (float(betas[0]), float(betas[1]))
    logger.info("AdamW: %d decay tensors (%d params, wd=%g), %d no-decay tensors (%d params), lr=%g, betas=%s, "
                "eps=%g", len(decay), sum(p.numel() for _, p in decay), weight_decay,
                len(no_decay), sum(p.numel() for _, p in no_decay), learning_rate, betas, eps)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)


def num_training_steps(max_steps: int | None, epochs: int, dataset_length: int, global_batch_size: int) -> int:
    """Optimizer steps the schedule spans: `max_steps` if set, else `ceil(len / gbs) * gbs * epochs // gbs`."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
    if max_steps is not None:
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive (or None to train for `epochs`), got {max_steps}.")
        return max_steps
    if epochs <= 0 or dataset_length <= 0:
        raise ValueError(f"Without max_steps, epochs and dataset_length must be positive, got epochs={epochs}, "
                         f"dataset_length={dataset_length}.")
    padded_length = math.ceil(dataset_length / global_batch_size) * global_batch_size
    return padded_length * epochs // global_batch_size


def step_decay_factor(step: int, decay_steps: int) -> float:
    """The `step-decay` lr factor: 1 before `decay_steps` scheduler steps, 0.1 from then on."""
    return 1.0 if step < decay_steps else STEP_DECAY_GAMMA


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, num_training_steps: int, warmup_ratio: float,
    decay_steps: int | None = None, warmup_steps: int | None = None, min_learning_rate: float | None = None,
) -> LambdaLR:
    """`constant`, `linear-warmup+cosine-decay` (linear 0 -> lr over `int(steps * warmup_ratio)` steps, then a
    half-cosine down to 0 at `num_training_steps`), `step-decay` (OpenVLA-OFT's MultiStepLR: the lr, x0.1 from step
    `decay_steps` on) or `warmup-steps+cosine-to-min` (openpi's CosineDecaySchedule: linear 0 -> lr over
    `warmup_steps` steps, then a half-cosine down to `min_learning_rate` at `num_training_steps`).

    The schedule is a pure function of the step: `state_dict()` / `load_state_dict()` restore it exactly (the current
    lr itself lives in the optimizer's state dict, restored alongside).
    """
    if kind == "constant":
        return get_constant_schedule(optimizer)
    if kind == "linear-warmup+cosine-decay":
        if num_training_steps <= 0:
            raise ValueError(f"num_training_steps must be positive, got {num_training_steps}.")
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1], got {warmup_ratio}.")
        num_warmup_steps = int(num_training_steps * warmup_ratio)
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
    if kind == "step-decay":
        if decay_steps is None or decay_steps < 1:
            raise ValueError(f"step-decay needs a positive lr_decay_steps, got {decay_steps}.")
        return LambdaLR(optimizer, partial(step_decay_factor, decay_steps=decay_steps))
    if kind == "warmup-steps+cosine-to-min":
        return _warmup_steps_cosine_to_min(optimizer, num_training_steps, warmup_steps, min_learning_rate)
    raise ValueError(f"Unknown lr_scheduler_type {kind!r}; choose one of {list(LR_SCHEDULERS)}.")


def _warmup_steps_cosine_to_min(optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_steps: int | None,
                                min_learning_rate: float | None) -> LambdaLR:
    """transformers' cosine-with-min-lr schedule; the lr factor at step t (W = warmup_steps, T = num_training_steps,
    r = min_learning_rate / lr) is t / W for t < W, else r + (1 - r) * 0.5 * (1 + cos(pi * (t - W) / (T - W)))."""
    if warmup_steps is None or min_learning_rate is None:
        raise ValueError("warmup-steps+cosine-to-min needs warmup_steps and min_learning_rate. Fix: pass "
                         "--vla.warmup_steps and --vla.min_learning_rate.")
    if not 0 <= warmup_steps < num_training_steps:
        raise ValueError(f"warmup_steps = {warmup_steps} is outside [0, {num_training_steps}) (the run's step budget). "
                         "Fix: pass a smaller --vla.warmup_steps, or a larger --vla.max_steps / --vla.epochs.")
    peak = optimizer.defaults["lr"]
    if not 0.0 <= min_learning_rate <= peak:
        raise ValueError(f"min_learning_rate = {min_learning_rate} is outside [0, learning_rate = {peak}]. Fix: pass "
                         "--vla.min_learning_rate in that range.")
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, num_training_steps,
                                                       min_lr=min_learning_rate)
