"""Small synthetic RLDS datasets, `demo_bridge` and `demo_libero`, that a tiny VLA learns on CPU in minutes.

Scene (units: metres, radians): a 0.5 m x 0.5 m table seen from above, three blocks of distinct colours (three of
red / green / blue / yellow) at random positions, and the end-effector (EE), drawn as a white ring that is filled
when the gripper is closed. The instruction names one block ("move to the red block"). Expert policy, per step:
- xy: `clip(target_xy - ee_xy, -MAX_STEP, MAX_STEP)` per axis (it lands exactly on the block when within reach);
- z: the EE hovers at `Z_LOW + Z_SLOPE * |target_xy - ee_xy|`, so it descends as it approaches (small dz);
- rotation: constant per episode (zero rotation delta);
- gripper: closes on the step that reaches the block, then stays closed while the EE holds still.
Everything is a deterministic function of (dataset name, seed, episode index): `make_scene` and `rollout`.

States are float32 and `action[t, :6] == state[t + 1, :6] - state[t, :6]` exactly (float32 arithmetic), so the
`bridge_orig` relabelling reproduces the actions. Gripper conventions as in the originals: demo_bridge action 1 =
open / 0 = closed; demo_libero action -1 = open / +1 = close. Layouts:
- demo_bridge: observation {image_0, image_1 (second camera, rotated view): JPEG [S, S, 3], state: float32[7] =
  xyz, rpy, gripper opening (1 open, 0 closed)}, action float32[7];
- demo_libero: observation {image: JPEG agent view, wrist_image: JPEG view around the EE with finger markers,
  state: float32[8] = xyz, axis-angle (3), finger positions (2), joint_state: float32[7]}, action float32[7].
"""

import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla_train.data.convert import (
    DEFAULT_VERSION,
    Example,
    dataset_exists,
    rlds_features,
    rlds_steps,
    split_indices,
    write_rlds_dataset,
)
from vla_train.data.tf_setup import tf  # noqa: F401  (TensorFlow before tensorflow_datasets)

# isort: split

import tensorflow_datasets as tfds

from vla_train.log import logger

DEMO_DATASETS = ("demo_bridge", "demo_libero")
COLORS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
                                           "yellow": (230, 200, 40)}
TEMPLATES = ("move to the {} block", "reach the {} block", "go to the {} block")
NUM_OBJECTS = 3
OBJECT_RANGE = 0.2  # object centres in [-0.2, 0.2]^2
START_RANGE = 0.22  # EE start in [-0.22, 0.22]^2
MIN_OBJECT_GAP = 0.12  # between object centres
MIN_START_DISTANCE = 0.12  # EE start to target
BLOCK_HALF = 0.035  # half side of a block
MAX_STEP = 0.03  # per-axis xy step bound
Z_LOW, Z_SLOPE = 0.02, 0.25  # hover height z = Z_LOW + Z_SLOPE * distance to the target
VIEW_EXTENT = 0.6  # metres covered by a top-down image
WRIST_EXTENT = 0.2  # metres covered by the wrist image
EE_RING = (0.014, 0.028)  # inner, outer radius of the EE marker
LIBERO_FINGER_OPEN, LIBERO_FINGER_CLOSED = 0.04, 0.005
_JOINT_MATRIX = np.random.default_rng(1234).uniform(-1.0, 1.0, size=(7, 3))  # fake kinematics: joints from xyz
_JOINT_OFFSET = np.array([0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8])


@dataclass(frozen=True)
class DemoScene:
    colors: tuple[str, ...]  # [K] colour names
    object_xy: np.ndarray  # [K, 2] float64 block centres
    target: int  # index of the named block
    start_xy: np.ndarray  # [2] float64 EE start
    rotation: np.ndarray  # [3] float64 constant EE orientation (rpy for bridge, axis-angle for libero)
    instruction: str

    @property
    def target_xy(self) -> np.ndarray:
        return self.object_xy[self.target]


@dataclass(frozen=True)
class Rollout:
    ee_xyz: np.ndarray  # [T + 1, 3] float64 EE positions (the last one follows the last action)
    closed: np.ndarray  # [T + 1] bool gripper state (closed after a closing action)
    close_action: np.ndarray  # [T] bool gripper command


def make_scene(dataset: str, seed: int, episode_index: int) -> DemoScene:
    """The scene of one episode: a deterministic function of (dataset, seed >= 0, episode_index >= 0)."""
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode()), episode_index])
    colors = tuple(str(c) for c in rng.choice(list(COLORS), size=NUM_OBJECTS, replace=False))
    objects: list[np.ndarray] = []
    while len(objects) < NUM_OBJECTS:
        xy = rng.uniform(-OBJECT_RANGE, OBJECT_RANGE, size=2)
        if all(np.linalg.norm(xy - other) >= MIN_OBJECT_GAP for other in objects):
            objects.append(xy)
    target = int(rng.integers(NUM_OBJECTS))
    start = rng.uniform(-START_RANGE, START_RANGE, size=2)
    while np.linalg.norm(start - objects[target]) < MIN_START_DISTANCE:
        start = rng.uniform(-START_RANGE, START_RANGE, size=2)
    rotation = rng.uniform(-0.3, 0.3, size=3)
    instruction = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(colors[target])
    return DemoScene(colors=colors, object_xy=np.stack(objects), target=target, start_xy=start, rotation=rotation,
                     instruction=instruction)


def hover_height(ee_xy: np.ndarray, target_xy: np.ndarray) -> float:
    return Z_LOW + Z_SLOPE * float(np.linalg.norm(target_xy - ee_xy))


def expert_step(ee_xy: np.ndarray, target_xy: np.ndarray) -> tuple[np.ndarray, bool]:
    """Next EE xy (a per-axis step of at most MAX_STEP toward the target) and whether this step reaches it."""
    difference = target_xy - ee_xy
    if np.all(np.abs(difference) <= MAX_STEP):
        return target_xy.copy(), True
    return ee_xy + np.clip(difference, -MAX_STEP, MAX_STEP), False


def rollout(scene: DemoScene, episode_length: int) -> Rollout:
    """The expert's EE path and gripper over `episode_length` steps."""
    xy, closed = [scene.start_xy], [False]
    close_action = []
    for _ in range(episode_length):
        next_xy, arrives = expert_step(xy[-1], scene.target_xy)
        close_action.append(closed[-1] or arrives)
        xy.append(next_xy)
        closed.append(close_action[-1])
    z = [hover_height(p, scene.target_xy) for p in xy]
    return Rollout(ee_xyz=np.column_stack([np.stack(xy), z]), closed=np.array(closed),
                   close_action=np.array(close_action))


# ------------------------------------------------------------------------------------------------------- rendering
def render(scene: DemoScene, ee_xy: np.ndarray, closed: bool, size: int, *, center: Sequence[float] = (0.0, 0.0),
           extent: float = VIEW_EXTENT, background: Sequence[int] = (170, 140, 100),
           fingers: bool = False) -> np.ndarray:
    """Top-down uint8 `[size, size, 3]` image of `extent` metres around `center` (+x right, +y up)."""
    pixel = (np.arange(size) + 0.5) / size - 0.5
    x = center[0] + pixel[None, :] * extent
    y = center[1] - pixel[:, None] * extent
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    for color, (ox, oy) in zip(scene.colors, scene.object_xy, strict=True):
        image[(np.abs(x - ox) <= BLOCK_HALF) & (np.abs(y - oy) <= BLOCK_HALF)] = COLORS[color]
    distance = np.hypot(x - ee_xy[0], y - ee_xy[1])
    ring = distance <= EE_RING[1] if closed else (distance >= EE_RING[0]) & (distance <= EE_RING[1])
    image[ring] = (245, 245, 245)
    if fingers:  # two dark bars beside the EE, closer together when closed
        gap = 0.006 if closed else 0.03
        for side in (-1, 1):
            bar = (np.abs(x - ee_xy[0] - side * (gap + 0.006)) <= 0.006) & (np.abs(y - ee_xy[1]) <= 0.03)
            image[bar] = (30, 30, 30)
    return image


def _bridge_views(scene: DemoScene, ee_xy: np.ndarray, closed: bool, size: int) -> dict[str, np.ndarray]:
    second = render(scene, ee_xy, closed, size, extent=VIEW_EXTENT + 0.1, background=(120, 110, 100))
    return {"image_0": render(scene, ee_xy, closed, size), "image_1": np.ascontiguousarray(np.rot90(second))}


def _libero_views(scene: DemoScene, ee_xy: np.ndarray, closed: bool, size: int) -> dict[str, np.ndarray]:
    return {"image": render(scene, ee_xy, closed, size, background=(150, 150, 150)),
            "wrist_image": render(scene, ee_xy, closed, size, center=ee_xy, extent=WRIST_EXTENT,
                                  background=(150, 150, 150), fingers=True)}


# -------------------------------------------------------------------------------------------------------- episodes
def episode_arrays(dataset: str, seed: int, episode_index: int, episode_length: int,
                   image_size: int) -> dict[str, Any]:
    """Time-batched `observation` dict, `action` float32 `[T, 7]` and `instructions` `[T]` of one episode."""
    scene = make_scene(dataset, seed, episode_index)
    path = rollout(scene, episode_length)
    rotation = np.repeat(scene.rotation[None], episode_length + 1, axis=0)
    if dataset == "demo_bridge":
        gripper_state = (~path.closed).astype(np.float64)[:, None]  # opening: 1 open, 0 closed
        gripper_action = (~path.close_action).astype(np.float32)  # 1 open, 0 closed
        views = _bridge_views
    elif dataset == "demo_libero":
        finger = np.where(path.closed, LIBERO_FINGER_CLOSED, LIBERO_FINGER_OPEN)[:, None]
        gripper_state = np.concatenate([finger, -finger], axis=1)
        gripper_action = np.where(path.close_action, 1.0, -1.0).astype(np.float32)  # -1 open, +1 close
        views = _libero_views
    else:
        raise ValueError(f"Unknown demo dataset {dataset!r}; choose from {DEMO_DATASETS}.")
    state = np.concatenate([path.ee_xyz, rotation, gripper_state], axis=1).astype(np.float32)  # [T + 1, S]
    action = np.concatenate([state[1:, :6] - state[:-1, :6], gripper_action[:, None]], axis=1)
    frames = [views(scene, path.ee_xyz[t, :2], bool(path.closed[t]), image_size) for t in range(episode_length)]
    observation = {key: np.stack([frame[key] for frame in frames]) for key in frames[0]}
    observation["state"] = state[:-1]
    if dataset == "demo_libero":
        observation["joint_state"] = (path.ee_xyz[:-1] @ _JOINT_MATRIX.T + _JOINT_OFFSET).astype(np.float32)
    return {"observation": observation, "action": action, "instructions": [scene.instruction] * episode_length,
            "rewards": path.closed[1:].astype(np.float32)}


def _features(dataset: str, image_size: int) -> tfds.features.FeaturesDict:
    def image() -> tfds.features.Image:
        return tfds.features.Image(shape=(image_size, image_size, 3), dtype=np.uint8, encoding_format="jpeg")

    if dataset == "demo_bridge":
        observation = {"image_0": image(), "image_1": image(),
                       "state": tfds.features.Tensor(shape=(7,), dtype=np.float32)}
    else:
        observation = {"image": image(), "wrist_image": image(),
                       "state": tfds.features.Tensor(shape=(8,), dtype=np.float32),
                       "joint_state": tfds.features.Tensor(shape=(7,), dtype=np.float32)}
    return rlds_features(observation, 7, {"episode_index": tfds.features.Scalar(dtype=np.int32),
                                          "seed": tfds.features.Scalar(dtype=np.int64)})


def write_demo_datasets(data_root: str | Path, *, num_episodes: int = 40, episode_length: int = 20,
                        image_size: int = 64, seed: int = 0, val_fraction: float = 0.1,
                        datasets: Sequence[str] = DEMO_DATASETS, overwrite: bool = False) -> list[Path]:
    """Write the demo datasets as `<data_root>/<name>/1.0.0/` (tfds RLDS, `train` + `val` splits, no network).

    Idempotent: an existing dataset is left alone (with a warning if it was written with other settings) unless
    `overwrite`. Returns the dataset directories.
    """
    if num_episodes < 1 or episode_length < 3 or image_size < 16 or seed < 0:
        raise ValueError(f"Need num_episodes >= 1, episode_length >= 3 (bridge_orig drops two steps), "
                         f"image_size >= 16 and seed >= 0; got {num_episodes}, {episode_length}, {image_size}, {seed}.")
    settings = {"generator": "vla_train.data.demo", "num_episodes": num_episodes, "episode_length": episode_length,
                "image_size": image_size, "seed": seed, "val_fraction": val_fraction}
    written = []
    for dataset in datasets:
        if dataset not in DEMO_DATASETS:
            raise ValueError(f"Unknown demo dataset {dataset!r}; choose from {DEMO_DATASETS}.")
        target = Path(data_root) / dataset / DEFAULT_VERSION
        if dataset_exists(data_root, dataset) and not overwrite:
            existing = json.loads((target / "metadata.json").read_text()) if (target / "metadata.json").is_file() else {}
            if existing != settings:
                logger.warning(f"Keeping {target}, written with {existing}, not {settings}; pass overwrite to redo it.")
            else:
                logger.info(f"Keeping existing {target}.")
            written.append(target)
            continue

        def examples(indices: list[int], dataset: str = dataset) -> Iterator[tuple[str, Example]]:
            for index in indices:
                arrays = episode_arrays(dataset, seed, index, episode_length, image_size)
                steps = rlds_steps(arrays["observation"], arrays["action"], arrays["instructions"], arrays["rewards"])
                yield f"episode_{index:06d}", {"steps": steps,
                                                "episode_metadata": {"episode_index": index, "seed": seed}}

        splits = split_indices(num_episodes, val_fraction, seed)
        written.append(write_rlds_dataset(
            data_root, dataset, _features(dataset, image_size),
            {split: (lambda ids=ids, fn=examples: fn(ids)) for split, ids in splits.items()},
            description=f"Synthetic {dataset} demo data (vla_train.data.demo).", metadata=settings,
            overwrite=True))
        logger.info(f"Wrote {dataset} ({ {s: len(i) for s, i in splits.items()} } episodes) to {target}.")
    return written
