"""Standardization transforms: one per OXE dataset family, turning a raw RLDS trajectory into the common format.

A transform takes one trajectory (a dict of tensors batched over time `T`, as read from the `steps` of an RLDS
episode, plus `traj_metadata` broadcast over time when the episode has metadata) and returns it with:
- `observation`: a dict holding the camera / depth / state keys the dataset's YAML entry names;
- `action`: float32 `[T, 7]` for EEF_POS datasets (xyz delta, rpy delta, gripper with 1 = open, 0 = closed);
- `language_instruction`: string `[T]`.
Transforms run inside `tf.data` graphs: TensorFlow ops only, no Python-side data-dependent control flow.

Register with `@register("name", ...)` in a module of this package; every module here is imported on first lookup,
so adding a family means adding a file.
"""

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

Trajectory = dict[str, Any]
StandardizeFn = Callable[[Trajectory], Trajectory]

STANDARDIZE_TRANSFORMS: dict[str, StandardizeFn] = {}
_loaded = False


def register(*names: str) -> Callable[[StandardizeFn], StandardizeFn]:
    """Register a transform under one or more dataset / transform names."""

    def decorator(fn: StandardizeFn) -> StandardizeFn:
        for name in names:
            if name in STANDARDIZE_TRANSFORMS and STANDARDIZE_TRANSFORMS[name] is not fn:
                raise ValueError(f"Standardization transform {name!r} is registered twice.")
            STANDARDIZE_TRANSFORMS[name] = fn
        return fn

    return decorator


def load_all_transforms() -> dict[str, StandardizeFn]:
    """Import every module of this package (each registers its transforms) and return the registry."""
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True
    return STANDARDIZE_TRANSFORMS


def get_standardize_transform(name: str) -> StandardizeFn:
    transforms = load_all_transforms()
    if name not in transforms:
        raise ValueError(f"Unknown standardization transform {name!r}; registered: {sorted(transforms)}.")
    return transforms[name]
