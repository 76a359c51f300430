"""Planning checks: data errors named early, while `plan_mixture` runs (before statistics, streaming or any write).

- `locate_datasets`: every member of the mixture present under the data root, or one error naming all the missing
  ones with the paths looked at (or, with `allow_missing_datasets`, a warning and the members present);
- `check_dataset_keys`: the dataset's standardization transform is traced once on a symbolic trajectory built from
  the dataset's own element spec (its `features.json`, as the RLDS reader yields it), so a key the transform reads
  and the data lacks is named here instead of as a raw TensorFlow `KeyError` at the first batch; then every camera,
  depth and state key of the YAML entry is looked up in the standardized observation;
- `check_labeled`: a training split without any language instruction would make the stream wait forever
  (`skip_unlabeled` filters every step), so it is refused, from the counts the statistics keep.
"""

import re
from pathlib import Path
from typing import Any

from vla_train.data.registry import DatasetSpec
from vla_train.data.rlds import DatasetNotFoundError, datasets_present, find_dataset_dir
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.statistics import LABEL_KEYS
from vla_train.data.tf_setup import tf
from vla_train.log import logger


def locate_datasets(entries: list[tuple[DatasetSpec, float]], data_root: Path, data_mix: str,
                    allow_missing: bool = False) -> list[tuple[DatasetSpec, float, Path]]:
    """`(spec, weight, dataset_dir)` of the members present; raises naming every missing one (with the path looked
    at) unless `allow_missing`, which warns and keeps the others (an error when none is present)."""
    located, missing = [], []
    for spec, weight in entries:
        try:
            located.append((spec, weight, find_dataset_dir(data_root, spec)))
        except DatasetNotFoundError as error:
            missing.append((spec.name, error))
    if not missing:
        return located
    if len(entries) == 1:
        raise missing[0][1]
    lines = "\n".join(f"  - {name}: looked for {error.looked_at} ({error.reason})" for name, error in missing)
    summary = (f"Mixture {data_mix!r}: {len(missing)} of its {len(entries)} datasets are missing under {data_root}:\n"
               f"{lines}\nDatasets present there: {datasets_present(Path(data_root)) or 'none'}.")
    if not located:
        raise FileNotFoundError(f"{summary} None of its datasets is present: download them or fix data_root_dir.")
    if not allow_missing:
        raise FileNotFoundError(f"{summary} Download them or fix data_root_dir, or set allow_missing_datasets=True to "
                                f"train on the {len(located)} present ({', '.join(s.name for s, _, _ in located)}).")
    total = sum(weight for _, weight, _ in located)
    weights = ", ".join(f"{spec.name} {weight / total:.4f}" for spec, weight, _ in located)
    logger.warning("%s\nallow_missing_datasets=True: training on the %d present, mixture weights renormalized: %s",
                   summary, len(located), weights)
    return located


def feature_paths(element_spec: Any, prefix: str = "") -> list[str]:
    """`observation/image`-style paths of every leaf of a (nested dict) element spec."""
    if not isinstance(element_spec, dict):
        return [prefix]
    return [path for key, value in sorted(element_spec.items())
            for path in feature_paths(value, f"{prefix}/{key}" if prefix else str(key))]


def _missing_key(error: KeyError) -> str:
    """The key of a `KeyError` raised while tracing (autograph re-raises it with a multi-line message)."""
    candidate: BaseException | None = error
    for _ in range(8):
        if candidate is None:
            break
        if type(candidate) is KeyError and candidate.args:
            return str(candidate.args[0])
        candidate = candidate.__cause__ or candidate.__context__
    match = re.search(r"KeyError: '([^']*)'", str(error))
    return match.group(1) if match else str(error)


def _trace_standardization(spec: DatasetSpec, element_spec: Any, dataset_dir: Path) -> dict[str, Any]:
    """Trace the transform on a symbolic trajectory; returns `{"observation": keys, "action_shape": shape}`."""
    transform = get_standardize_transform(spec.standardize)
    seen: dict[str, Any] = {}

    def probe(trajectory: dict[str, Any]) -> None:
        output = transform(trajectory)
        observation = output.get("observation")
        seen["observation"] = sorted(observation) if isinstance(observation, dict) else None
        action = output.get("action")
        seen["action_shape"] = tuple(action.shape) if isinstance(action, tf.Tensor) else None

    present = feature_paths(element_spec)
    where = f"Dataset {spec.name!r} at {dataset_dir}"
    try:
        tf.function(probe).get_concrete_function(element_spec)
    except KeyError as error:
        raise ValueError(
            f"{where}: its standardization transform {spec.standardize!r} reads {_missing_key(error)!r}, which the "
            f"dataset's features (features.json) lack; features present: {present}. Fix: set `standardize:` in "
            f"{spec.source} to the transform written for this layout, or use data in the layout it expects."
        ) from error
    except (TypeError, ValueError) as error:
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(f"{where}: its standardization transform {spec.standardize!r} fails on the dataset's "
                         f"features ({type(error).__name__}: {last_line}); features present: {present}.") from error
    if seen.get("observation") is None:
        raise ValueError(f"{where}: standardization {spec.standardize!r} produced no 'observation' dict.")
    return seen


def _configured_keys(spec: DatasetSpec) -> list[tuple[str, str]]:
    """`(where in the YAML entry, observation key)` of every camera, depth and state key the entry names."""
    keys = [(f"{field}.{view}", key) for field in ("image_obs_keys", "depth_obs_keys")
            for view, key in getattr(spec, field).items() if key is not None]
    keys += [(f"state_obs_keys[{i}]", key) for i, key in enumerate(spec.state_obs_keys) if key is not None]
    return keys


def check_dataset_keys(spec: DatasetSpec, element_spec: Any, dataset_dir: Path) -> None:
    """Refuse a dataset whose transform reads, or whose YAML entry names, a key its features lack (see module doc)."""
    seen = _trace_standardization(spec, element_spec, dataset_dir)
    observation = seen["observation"]
    missing = [f"{where}: {key!r}" for where, key in _configured_keys(spec) if key not in observation]
    if missing:
        raw = feature_paths(element_spec.get("observation", {})) if isinstance(element_spec, dict) else []
        raise ValueError(
            f"Dataset {spec.name!r} at {dataset_dir}: its YAML entry ({spec.source}) names observation keys the "
            f"dataset does not have: {'; '.join(missing)}. Keys present after standardization {spec.standardize!r}: "
            f"{observation} (features.json observation: {raw}). Fix the entry: name one of those keys, or null for a "
            f"camera the dataset lacks.")
    shape = seen["action_shape"]
    if shape is not None and (len(shape) != 2 or shape[-1] not in (None, spec.action_dim)):
        raise ValueError(f"Dataset {spec.name!r} at {dataset_dir}: standardized actions have shape {list(shape)}, but "
                         f"its YAML entry says action_dim={spec.action_dim} ({spec.action_encoding}); fix one of them.")


def check_labeled(spec: DatasetSpec, dataset_dir: Path, split: str, stats: dict[str, Any]) -> None:
    """Refuse a training split in which no step has a language instruction (the stream would wait forever)."""
    if stats[LABEL_KEYS[0]] > 0:
        return
    raise ValueError(
        f"Dataset {spec.name!r} at {dataset_dir}: none of the {stats['num_transitions']} steps "
        f"({stats['num_trajectories']} trajectories) of its training split {split!r} has a language instruction, and "
        f"the pipeline keeps only instructed steps (skip_unlabeled=True), so its stream would wait forever. Fix: add "
        f"instructions, check what standardization {spec.standardize!r} returns as language_instruction, or remove "
        f"the dataset from the mixture.")
