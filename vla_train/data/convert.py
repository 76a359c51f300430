"""Convert a folder of your own episode files into an RLDS dataset that vla-train can train on.

Expected layout: one file per episode under `input_dir` (searched recursively, taken in sorted path order), either
`.npz` (`numpy.savez`) or `.h5` / `.hdf5` (h5py; a key may be a group path such as `obs/agentview`). With `T` steps,
each file holds:
- images: one or more uint8 RGB arrays `[T, H, W, 3]`, named by `image_keys` (default: every uint8 `[T, H, W, 3]`
  array of the first file); every episode has the same image keys and shapes;
- `actions`: float `[T, A]` (stored as float32), finite, with one `A` for all episodes. For EEF_POS (`A = 7`):
  xyz delta (m), rpy delta (rad), gripper with 1 = open, 0 = closed. The `passthrough` standardization leaves actions
  as they are, so convert your gripper to that convention first;
- `state` (optional): float `[T, S]` proprioception (present in all episodes or in none);
- `instruction`: one string or `[T]` strings (an .npz str array, an HDF5 string dataset or root attribute);
  `default_instruction` is used for files without one.

Output: `<out_root>/<name>/1.0.0/`, written with tensorflow-datasets in the RLDS layout: `steps` =
{observation: {<image keys>: JPEG image, state: float32[S]}, action: float32[A], language_instruction,
is_first, is_last, is_terminal (= is_last), reward (1.0 on the last step), discount}, and
`episode_metadata` = {file_path, episode_index}; a `train` split and, if `val_fraction > 0`, a `val` split of
randomly chosen episodes. Next to it, `<out_root>/<name>/vla_train_dataset.yaml` holds the registry entry
(`standardize: passthrough`): copy it into `<registry_dir>/datasets/` and train with data root `<out_root>`.
Every file is checked before anything is written; a bad file raises a ValueError naming the file and the problem.
"""

import re
import shutil
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vla_train.data.registry import ACTION_ENCODINGS, STATE_ENCODINGS
from vla_train.data.tf_setup import tf  # noqa: F401  (TensorFlow before tensorflow_datasets)

# isort: split

import tensorflow_datasets as tfds

from vla_train.log import logger

EPISODE_SUFFIXES = (".npz", ".h5", ".hdf5")
YAML_FILENAME = "vla_train_dataset.yaml"
DEFAULT_VERSION = "1.0.0"
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
Example = dict[str, Any]
SplitExamples = Callable[[], Iterator[tuple[str, Example]]]


# ----------------------------------------------------------------------------------------------- generic RLDS writing
class _RLDSBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose features and split generators are given at construction (subclassed per dataset name)."""

    VERSION = tfds.core.Version(DEFAULT_VERSION)

    def __init__(self, *, features: tfds.features.FeaturesDict, splits: dict[str, SplitExamples], description: str,
                 metadata: dict[str, Any], **kwargs: Any) -> None:
        self._features, self._splits = features, splits
        self._description, self._metadata = description, metadata
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # shuffled by key like the Open-X datasets: an ordered dataset refuses parallel interleaved reads
        return tfds.core.DatasetInfo(builder=self, features=self._features, description=self._description,
                                     metadata=tfds.core.MetadataDict(self._metadata))

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, Example]]]:
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, Example]]:
        yield from self._splits[split]()


def dataset_exists(data_root: str | Path, name: str, version: str = DEFAULT_VERSION) -> bool:
    return (Path(data_root) / name / version / "dataset_info.json").is_file()


def write_rlds_dataset(data_root: str | Path, name: str, features: tfds.features.FeaturesDict,
                       splits: dict[str, SplitExamples], *, description: str = "",
                       metadata: dict[str, Any] | None = None, version: str = DEFAULT_VERSION,
                       overwrite: bool = False) -> Path:
    """Write `<data_root>/<name>/<version>/` with tfds (no network); returns that directory.

    `splits` maps a split name to a function yielding `(unique key, example)`; tfds stores them in key-hash order.
    """
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"Dataset name {name!r} must be lower_snake_case (letters, digits, underscores).")
    target = Path(data_root) / name / version
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite true) to replace it.")
        shutil.rmtree(target)
    body = {"name": name, "__module__": __name__, "VERSION": tfds.core.Version(version),
            "RELEASE_NOTES": {version: description or name}}
    builder_cls = types.new_class(f"RLDS_{name}", (_RLDSBuilder,), {"skip_registration": True},
                                  lambda namespace: namespace.update(body))
    builder = builder_cls(data_dir=str(data_root), features=features, splits=splits, description=description,
                          metadata=dict(metadata or {}))
    # tfds prints its progress messages to stdout: keep stdout for the caller (the converter prints YAML there)
    with tempfile.TemporaryDirectory(prefix="vla_train_tfds_") as download_dir, redirect_stdout(sys.stderr):
        builder.download_and_prepare(download_dir=download_dir,
                                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return target


def rlds_features(observation: dict[str, Any], action_dim: int,
                  episode_metadata: dict[str, Any] | None = None) -> tfds.features.FeaturesDict:
    """The RLDS feature structure: `steps` (observation, action float32[A], language, flags, reward, discount)."""
    steps = tfds.features.Dataset({
        "observation": tfds.features.FeaturesDict(observation),
        "action": tfds.features.Tensor(shape=(action_dim,), dtype=np.float32),
        "language_instruction": tfds.features.Text(),
        "is_first": tfds.features.Scalar(dtype=np.bool_),
        "is_last": tfds.features.Scalar(dtype=np.bool_),
        "is_terminal": tfds.features.Scalar(dtype=np.bool_),
        "reward": tfds.features.Scalar(dtype=np.float32),
        "discount": tfds.features.Scalar(dtype=np.float32),
    })
    features = {"steps": steps}
    if episode_metadata:
        features["episode_metadata"] = tfds.features.FeaturesDict(episode_metadata)
    return tfds.features.FeaturesDict(features)


def rlds_steps(observations: dict[str, np.ndarray], actions: np.ndarray, instructions: Sequence[str],
               rewards: np.ndarray | None = None) -> list[Example]:
    """Per-step RLDS dicts from time-batched arrays (`[T, ...]` each); reward defaults to 1.0 on the last step."""
    length = len(actions)
    if rewards is None:
        rewards = np.zeros(length, np.float32)
        rewards[-1] = 1.0
    return [{"observation": {key: value[t] for key, value in observations.items()},
             "action": np.asarray(actions[t], np.float32), "language_instruction": instructions[t],
             "is_first": t == 0, "is_last": t == length - 1, "is_terminal": t == length - 1,
             "reward": float(rewards[t]), "discount": 1.0} for t in range(length)]


def split_indices(num_episodes: int, val_fraction: float, seed: int = 0) -> dict[str, list[int]]:
    """Episode indices per split: `val` = round(val_fraction * N) (at least 1 when the fraction is > 0 and N >= 2)
    episodes chosen with `seed`; no `val` split when that is 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    num_val = round(val_fraction * num_episodes)
    if val_fraction > 0 and num_episodes >= 2:
        num_val = min(max(num_val, 1), num_episodes - 1)
    val = set(np.random.default_rng(seed).permutation(num_episodes)[:num_val].tolist())
    splits = {"train": [i for i in range(num_episodes) if i not in val]}
    if val:
        splits["val"] = sorted(val)
    return splits


# ------------------------------------------------------------------------------------------------ episode files
@dataclass(frozen=True)
class Episode:
    """One validated episode file: `T` steps."""

    path: Path
    images: dict[str, np.ndarray]  # key -> uint8 [T, H, W, 3]
    actions: np.ndarray  # float32 [T, A]
    state: np.ndarray | None  # float32 [T, S]
    instructions: list[str]  # [T]


@dataclass(frozen=True)
class ConversionResult:
    dataset_dir: Path  # <out_root>/<name>/1.0.0
    yaml_path: Path  # <out_root>/<name>/vla_train_dataset.yaml
    yaml_text: str
    split_sizes: dict[str, int]  # episodes per split


def find_episode_files(input_dir: str | Path) -> list[Path]:
    directory = Path(input_dir)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory of episode files.")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in EPISODE_SUFFIXES)
    if not files:
        raise ValueError(f"{directory}: no episode files ({', '.join('*' + s for s in EPISODE_SUFFIXES)}) found.")
    return files


def read_episode_file(path: Path) -> dict[str, Any]:
    """Every array of an `.npz`, or every dataset (by its path) and root attribute of an HDF5 file."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        import h5py  # imported only for HDF5 input

        arrays: dict[str, Any] = {}
        with h5py.File(path, "r") as file:
            def visit(key: str, node: Any) -> None:
                if isinstance(node, h5py.Dataset):
                    arrays[key] = node.asstr()[()] if h5py.check_string_dtype(node.dtype) else node[()]

            file.visititems(visit)
            for key, value in file.attrs.items():
                arrays.setdefault(key, value)
        return arrays
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the episode file ({error}). Store strings as str arrays, not "
                         f"Python objects.") from error


def _strings(path: Path, key: str, value: Any, length: int) -> list[str]:
    array = np.asarray(value)
    if array.dtype.kind not in "SUO":
        raise ValueError(f"{path}: {key!r} must be a string or [T] strings, got dtype {array.dtype}.")
    flat = [item.decode() if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
    if array.ndim == 0 or len(flat) == 1:
        return flat * length
    if array.ndim != 1 or len(flat) != length:
        raise ValueError(f"{path}: mismatched lengths: {key!r} has shape {array.shape}, actions have {length} steps.")
    return flat


def _is_image(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 4 and value.shape[-1] == 3


def load_episode(path: Path, *, image_keys: Sequence[str], action_key: str = "actions", state_key: str = "state",
                 instruction_key: str = "instruction", default_instruction: str | None = None,
                 require_state: bool | None = None) -> Episode:
    """Read and validate one episode file (see the module docstring); errors name the file and the problem."""
    arrays = read_episode_file(path)

    def missing(key: str) -> ValueError:
        return ValueError(f"{path}: missing key {key!r}; the file holds {sorted(arrays)}.")

    if action_key not in arrays:
        raise missing(action_key)
    actions = np.asarray(arrays[action_key])
    if actions.ndim != 2 or actions.dtype.kind not in "fiu" or len(actions) == 0:
        raise ValueError(f"{path}: {action_key!r} must be a non-empty numeric [T, A] array, got shape "
                         f"{actions.shape} dtype {actions.dtype}.")
    bad = int(np.size(actions) - np.count_nonzero(np.isfinite(actions)))
    if bad:
        raise ValueError(f"{path}: {action_key!r} holds {bad} non-finite values (NaN/inf) out of {actions.size}.")
    length = len(actions)
    lengths = {action_key: length}
    images: dict[str, np.ndarray] = {}
    for key in image_keys:
        if key not in arrays:
            raise missing(key)
        image = arrays[key]
        if not _is_image(image):
            raise ValueError(f"{path}: image {key!r} must be uint8 [T, H, W, 3], got shape {np.shape(image)} dtype "
                             f"{getattr(image, 'dtype', type(image).__name__)}.")
        images[key], lengths[key] = image, len(image)
    state = None
    if state_key in arrays:
        if require_state is False:
            raise ValueError(f"{path}: holds {state_key!r} but the first episode does not; give a state in every "
                             f"episode or in none.")
        state = np.asarray(arrays[state_key])
        if state.ndim != 2 or state.dtype.kind not in "fiu":
            raise ValueError(f"{path}: {state_key!r} must be a numeric [T, S] array, got shape {state.shape} "
                             f"dtype {state.dtype}.")
        bad = int(np.size(state) - np.count_nonzero(np.isfinite(state)))
        if bad:
            raise ValueError(f"{path}: {state_key!r} holds {bad} non-finite values (NaN/inf).")
        lengths[state_key] = len(state)
    elif require_state:
        raise ValueError(f"{path}: missing key {state_key!r} (the first episode has one); the file holds "
                         f"{sorted(arrays)}.")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: mismatched lengths across arrays (steps per key): {lengths}.")
    if instruction_key in arrays:
        instructions = _strings(path, instruction_key, arrays[instruction_key], length)
    elif default_instruction is not None:
        instructions = [default_instruction] * length
    else:
        raise missing(instruction_key)
    return Episode(path=path, images=images, actions=actions.astype(np.float32),
                   state=None if state is None else state.astype(np.float32), instructions=instructions)


def _check_consistent(first: Episode, episode: Episode, action_key: str, state_key: str) -> None:
    if episode.actions.shape[1] != first.actions.shape[1]:
        raise ValueError(f"{episode.path}: mixed action dims across episodes: {action_key!r} has "
                         f"{episode.actions.shape[1]} dims, {first.path.name} has {first.actions.shape[1]}.")
    for key, image in episode.images.items():
        if image.shape[1:] != first.images[key].shape[1:]:
            raise ValueError(f"{episode.path}: image {key!r} is {image.shape[1:]}, {first.path.name} has "
                             f"{first.images[key].shape[1:]}; resize all episodes to one shape.")
    if first.state is not None and episode.state is not None and episode.state.shape[1] != first.state.shape[1]:
        raise ValueError(f"{episode.path}: mixed state dims across episodes: {state_key!r} has "
                         f"{episode.state.shape[1]} dims, {first.path.name} has {first.state.shape[1]}.")


def assign_camera_views(image_keys: Sequence[str]) -> dict[str, str | None]:
    """Observation keys -> camera views: a key containing "wrist" is the wrist camera, the others are primary and
    secondary in order (a lone wrist key becomes primary); more keys are written but left out of the entry."""
    wrist = next((key for key in image_keys if "wrist" in key.lower()), None)
    others = [key for key in image_keys if key != wrist]
    if not others:
        others, wrist = [wrist], None
    return {"primary": others[0], "secondary": others[1] if len(others) > 1 else None, "wrist": wrist}


def registry_entry_yaml(name: str, image_keys: Sequence[str], state_key: str | None, action_dim: int, *,
                        state_encoding: str = "NONE", action_encoding: str = "EEF_POS",
                        version: str = DEFAULT_VERSION) -> str:
    """The `datasets: {name: entry}` YAML of a converted dataset (standardize: passthrough)."""
    entry = {"image_obs_keys": assign_camera_views(image_keys),
             "depth_obs_keys": {"primary": None, "secondary": None, "wrist": None},
             "state_obs_keys": [state_key] if state_key else [], "state_encoding": state_encoding,
             "action_encoding": action_encoding, "action_dim": action_dim, "standardize": "passthrough",
             "version": version}
    header = (f"# Converted by vla-scripts/convert_episodes.py. Copy this file into <registry_dir>/datasets/ and "
              f"train with\n# data root = the folder holding {name}/. The last action dim is the gripper "
              f"(1 = open, 0 = closed).\n")
    return header + yaml.safe_dump({"datasets": {name: entry}}, sort_keys=False)


def convert_episodes(input_dir: str | Path, out_root: str | Path, name: str, *, image_keys: Sequence[str] | None = None,
                     action_key: str = "actions", state_key: str = "state", instruction_key: str = "instruction",
                     default_instruction: str | None = None, val_fraction: float = 0.0, seed: int = 0,
                     state_encoding: str = "NONE", action_encoding: str | None = None,
                     overwrite: bool = False) -> ConversionResult:
    """Validate every episode file of `input_dir`, then write the RLDS dataset and its registry YAML entry.

    `action_encoding` defaults to EEF_R6 for 10-D actions and EEF_POS otherwise (with `action_dim` = A).
    """
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"Dataset name {name!r} must be lower_snake_case (letters, digits, underscores).")
    if state_encoding not in STATE_ENCODINGS or (action_encoding is not None and action_encoding not in
                                                 ACTION_ENCODINGS):
        raise ValueError(f"state_encoding must be one of {STATE_ENCODINGS} and action_encoding one of "
                         f"{list(ACTION_ENCODINGS)}; got {state_encoding!r}, {action_encoding!r}.")
    if dataset_exists(out_root, name) and not overwrite:
        raise FileExistsError(f"{Path(out_root) / name / DEFAULT_VERSION} already exists; pass overwrite=True "
                              f"(--overwrite true) to replace it.")
    files = find_episode_files(input_dir)
    if image_keys is None:
        image_keys = sorted(key for key, value in read_episode_file(files[0]).items() if _is_image(value))
        if not image_keys:
            raise ValueError(f"{files[0]}: no uint8 [T, H, W, 3] image array found; name them with image_keys.")
    image_keys = list(image_keys)
    keys = dict(image_keys=image_keys, action_key=action_key, state_key=state_key, instruction_key=instruction_key,
                default_instruction=default_instruction)
    first = load_episode(files[0], **keys)
    has_state = first.state is not None
    for path in files[1:]:  # check everything before writing anything
        _check_consistent(first, load_episode(path, **keys, require_state=has_state), action_key, state_key)
    action_dim = first.actions.shape[1]
    if action_encoding is None:
        action_encoding = "EEF_R6" if action_dim == 10 else "EEF_POS"
    names = {key: key.replace("/", "_") for key in image_keys}
    state_name = state_key.replace("/", "_") if has_state else None
    if len({*names.values(), state_name} - {None}) != len(image_keys) + has_state:
        raise ValueError(f"Observation keys collide once '/' becomes '_': images {image_keys}, state {state_key!r}.")
    observation = {names[key]: tfds.features.Image(shape=first.images[key].shape[1:], dtype=np.uint8,
                                                   encoding_format="jpeg") for key in image_keys}
    if state_name:
        observation[state_name] = tfds.features.Tensor(shape=(first.state.shape[1],), dtype=np.float32)
    features = rlds_features(observation, action_dim, {"file_path": tfds.features.Text(),
                                                       "episode_index": tfds.features.Scalar(dtype=np.int32)})
    gripper_outside = 0

    def examples(indices: list[int]) -> Iterator[tuple[str, Example]]:
        nonlocal gripper_outside
        for index in indices:
            episode = load_episode(files[index], **keys, require_state=has_state)
            gripper_outside += int(np.sum((episode.actions[:, -1] < 0) | (episode.actions[:, -1] > 1)))
            obs = {names[key]: image for key, image in episode.images.items()}
            if state_name:
                obs[state_name] = episode.state
            yield f"episode_{index:06d}", {
                "steps": rlds_steps(obs, episode.actions, episode.instructions),
                "episode_metadata": {"file_path": str(files[index]), "episode_index": index}}

    splits = split_indices(len(files), val_fraction, seed)
    dataset_dir = write_rlds_dataset(
        out_root, name, features, {split: (lambda ids=ids: examples(ids)) for split, ids in splits.items()},
        description=f"Converted from {Path(input_dir).resolve()} by vla_train.data.convert.", overwrite=overwrite,
        metadata={"source": str(Path(input_dir).resolve()), "image_keys": image_keys, "action_dim": action_dim})
    if gripper_outside:
        logger.warning(f"{name}: {gripper_outside} gripper actions (last dim) lie outside [0, 1]; the passthrough "
                       f"transform expects 1 = open, 0 = closed.")
    yaml_text = registry_entry_yaml(name, [names[k] for k in image_keys], state_name, action_dim,
                                    state_encoding=state_encoding, action_encoding=action_encoding)
    yaml_path = Path(out_root) / name / YAML_FILENAME
    yaml_path.write_text(yaml_text)
    sizes = {split: len(ids) for split, ids in splits.items()}
    logger.info(f"Wrote {name} ({sizes} episodes) to {dataset_dir} and its registry entry to {yaml_path}.")
    return ConversionResult(dataset_dir=dataset_dir, yaml_path=yaml_path, yaml_text=yaml_text, split_sizes=sizes)
