"""The state a checkpoint holds, as a set of `torch.distributed.checkpoint.stateful.Stateful` objects.

`CheckpointManager.save/load` take `states` (one copy for the whole run: model, optimizer, scheduler, train state,
EMA when on) and `per_rank_states` (one copy per rank: data-stream position, RNG states). Adding a piece of state adds
an entry, not a parameter. Tensor states (`SHARDED = True`: model, optimizer, EMA) go into the DCP shards as DTensors
(no gather); every other state's `state_dict()` is stored as one opaque blob (rank 0's copy), so it loads back without
a template of its keys. `training_states` builds the standard set (torchtitan's `ModelWrapper`/`OptimizersContainer`
pattern: `get_state_dict` / `set_state_dict` inside a Stateful).
"""

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

from vla_train.training.checkpoint_io import capture_rng_state, restore_rng_state

MODEL, OPTIMIZER, SCHEDULER, TRAIN_STATE, EMA = "model", "optimizer", "scheduler", "train_state", "ema"
DATA, RNG = "data", "rng"
# States a run has exactly when an option is on -> that option: a resume must load them iff the checkpoint holds them.
OPTION_STATES = {EMA: "--vla.ema_decay"}


def is_sharded(state: Any) -> bool:
    """Whether `state` is saved as DCP tensors (sharded) rather than as one blob."""
    return bool(getattr(state, "SHARDED", False))


class ModelState(Stateful):
    """The (FSDP2-sharded) model's parameters and buffers, keyed by FQN as DTensors."""

    SHARDED = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


def _saved_before_the_first_step(path: Path) -> bool:
    """Whether the checkpoint's optimizer has no per-parameter state at all (saved before its first step)."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return not any(key.startswith(f"{OPTIMIZER}.state.") for key in saved)


class OptimizerState(Stateful):
    """The optimizer's per-parameter state (sharded like its parameters) and param groups, keyed by FQN.

    Saving: `get_optimizer_state_dict` gives a not yet stepped optimizer a state (a zero-lr step); that state is
    dropped again, so that saving before the first step does not shift AdamW's step count. Loading: `load_template`
    is the template DCP fills in (only the parameters that had a state when saved)."""

    SHARDED = True

    def __init__(self, model: nn.Module, optimizer: Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        had_state = bool(self.optimizer.state)
        state = get_optimizer_state_dict(self.model, self.optimizer)
        if not had_state:
            self.optimizer.state.clear()
            state["state"] = {}
        return state

    def load_template(self, path: Path) -> dict[str, Any]:
        """Every trainable parameter has a state once the optimizer stepped (the unused ViT tail is frozen, see
        `VisionBackbone.unused_modules`), so the template is complete, or empty for a save before the first step."""
        state = get_optimizer_state_dict(self.model, self.optimizer)
        if _saved_before_the_first_step(path):
            self.optimizer.state.clear()
            state["state"] = {}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


def check_option_states(path: Path, states: Mapping[str, Stateful], saved_keys: Iterable[str]) -> None:
    """A resume (the optimizer is loaded) loads an option's state (`OPTION_STATES`: the EMA) iff the checkpoint at
    `path` holds it (`saved_keys`: its DCP keys): a run with the option on must not restart it from the weights, one
    with it off must not silently drop it."""
    if OPTIMIZER not in states:
        return
    saved_keys = list(saved_keys)
    for key, option in OPTION_STATES.items():
        saved = any(k.startswith(f"{key}.") for k in saved_keys)
        if saved and key not in states:
            raise ValueError(f"{path} was saved with {option} (it holds an {key!r} state) but this run has it off. "
                             f"Fix: resume with the {option} of the run that saved it (see its config.yaml).")
        if key in states and not saved:
            raise ValueError(f"{path} was saved without {option} (it holds no {key!r} state) but this run sets it. "
                             f"Fix: resume without {option}, or start a new run from its weights with it "
                             "(--pretrained_checkpoint <checkpoint>.pt --is_resume false).")


class ObjectState(Stateful):
    """Any object with `state_dict()` / `load_state_dict()` (LR scheduler, data stream), stored as one blob; the
    object is read at save time (an async save captures the state of the save step)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.obj.load_state_dict(state_dict)


class DictState(Stateful):
    """A plain dict (e.g. the train state's counters); `load_state_dict` replaces its content."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values = dict(values or {})

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.values = dict(state_dict)


class RNGState(Stateful):
    """This process's python, numpy, torch CPU and (when in use) CUDA RNG states."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng_state(state_dict)


def training_states(model: nn.Module, optimizer: Optimizer | None, scheduler: Any | None,
                    data_stream: Any | None, ema: Stateful | None = None
                    ) -> tuple[dict[str, Stateful], dict[str, Stateful]]:
    """The standard set: `(states, per_rank_states)` of a training run. `data_stream`: whatever object the session
    exposes as its data stream (`state_dict()` / `load_state_dict()`: its position); None leaves it out. `ema`: the
    run's `ModelEMA` (a sharded Stateful, stored under "ema"), None when EMA is off."""
    states: dict[str, Stateful] = {MODEL: ModelState(model)}
    if optimizer is not None:
        states[OPTIMIZER] = OptimizerState(model, optimizer)
    if scheduler is not None:
        states[SCHEDULER] = ObjectState(scheduler)
    if ema is not None:
        if not is_sharded(ema):
            raise TypeError(f"training_states: ema must be a sharded Stateful (a ModelEMA), got {type(ema).__name__}.")
        states[EMA] = ema
    per_rank: dict[str, Stateful] = {RNG: RNGState()}
    if data_stream is not None:
        per_rank[DATA] = ObjectState(data_stream)
    return states, per_rank
