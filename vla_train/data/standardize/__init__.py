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

FrameFilterFn = Callable[[dict[str, Any]], Any]  # frame -> scalar tf.bool (keep the frame)

STANDARDIZE_TRANSFORMS: dict[str, StandardizeFn] = {}
FRAME_FILTERS: dict[str, FrameFilterFn] = {}
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


def register_frame_filter(name: str) -> Callable[[FrameFilterFn], FrameFilterFn]:
    """Register a per-dataset frame filter (applied to flattened frames, after normalization)."""

    def decorator(fn: FrameFilterFn) -> FrameFilterFn:
        if name in FRAME_FILTERS and FRAME_FILTERS[name] is not fn:
            raise ValueError(f"Frame filter {name!r} is registered twice.")
        FRAME_FILTERS[name] = fn
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


def get_frame_filter(name: str) -> FrameFilterFn:
    load_all_transforms()
    if name not in FRAME_FILTERS:
        raise ValueError(f"Unknown frame filter {name!r}; registered: {sorted(FRAME_FILTERS)}.")
    return FRAME_FILTERS[name]


def get_standardize_transform(name: str) -> StandardizeFn:
    transforms = load_all_transforms()
    if name not in transforms:
        raise ValueError(f"Unknown standardization transform {name!r}; registered: {sorted(transforms)}.")
    return transforms[name]
