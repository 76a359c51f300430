"""Tiny RLDS datasets written with tensorflow-datasets for pipeline tests, and a registry directory naming them."""

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vla_train.data.standardize import STANDARDIZE_TRANSFORMS
from vla_train.data.tf_setup import tf

TEST_TRANSFORM = "__pipeline_test__"


def _standardize(trajectory: dict[str, Any]) -> dict[str, Any]:
    return {**trajectory, "action": tf.cast(trajectory["action"], tf.float32)}


STANDARDIZE_TRANSFORMS.setdefault(TEST_TRANSFORM, _standardize)


def make_episodes(
    num_episodes: int, length: int, seed: int, action_dim: int = 7, image_size: int = 16, instruction: str | None = None
) -> list[dict[str, Any]]:
    """Episodes whose frames are identifiable: action[0] = episode index, action[1] = step index."""
    rng = np.random.default_rng(seed)
    episodes = []
    for e in range(num_episodes):
        action = rng.uniform(-1, 1, size=(length, action_dim)).astype(np.float32)
        action[:, 0], action[:, 1] = e, np.arange(length)
        action[:, -1] = rng.integers(0, 2, size=length)
        image = rng.integers(0, 256, size=(length, image_size, image_size, 3), dtype=np.uint8)
        episodes.append(
            {
                "steps": {
                    "observation": {
                        "image": image,
                        "wrist": image[:, ::-1],
                        "state": rng.normal(size=(length, 4)).astype(np.float32),
                    },
                    "action": action,
                    "language_instruction": [instruction if instruction is not None else f"task {e % 3}"] * length,
                    "is_first": np.arange(length) == 0,
                    "is_last": np.arange(length) == length - 1,
                }
            }
        )
    return episodes


def write_rlds(
    root: Path,
    name: str,
    splits: dict[str, list[dict[str, Any]]],
    image_size: int = 16,
    action_dim: int = 7,
    version: str = "1.0.0",
    num_shards: int | None = None,
) -> Path:
    """Write `<root>/<name>/<version>/` with the given episodes per split (in `num_shards` record files per split;
    None: tfds decides, one for these sizes); returns that directory."""

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self) -> tfds.core.DatasetInfo:
            image = tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="jpeg")
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "steps": tfds.features.Dataset(
                            {
                                "observation": {
                                    "image": image,
                                    "wrist": image,
                                    "state": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                                },
                                "action": tfds.features.Tensor(shape=(action_dim,), dtype=np.float32),
                                "language_instruction": tfds.features.Text(),
                                "is_first": np.bool_,
                                "is_last": np.bool_,
                            }
                        )
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(episodes) for split, episodes in splits.items()}

        def _generate_examples(self, episodes):
            for index, episode in enumerate(episodes):
                steps = episode["steps"]
                length = len(steps["action"])
                yield (
                    index,
                    {
                        "steps": [
                            {
                                "observation": {k: v[t] for k, v in steps["observation"].items()},
                                "action": steps["action"][t],
                                "language_instruction": steps["language_instruction"][t],
                                "is_first": steps["is_first"][t],
                                "is_last": steps["is_last"][t],
                            }
                            for t in range(length)
                        ]
                    },
                )

    Builder.name = name
    builder = Builder(data_dir=str(root))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS,
                                                     num_shards=num_shards)
    )
    return Path(root) / name / version


def write_registry(
    directory: Path, datasets: dict[str, dict[str, Any]], mixtures: dict[str, list] | None = None
) -> Path:
    """A registry directory (`datasets/test.yaml`, `mixtures.yaml`) for the fixture datasets."""
    import yaml

    (directory / "datasets").mkdir(parents=True, exist_ok=True)
    entries = {
        name: {
            "image_obs_keys": {"primary": "image", "wrist": "wrist"},
            "state_obs_keys": ["state", None],
            "state_encoding": "POS_EULER",
            "action_encoding": "EEF_POS",
            "standardize": TEST_TRANSFORM,
            **extra,
        }
        for name, extra in datasets.items()
    }
    (directory / "datasets" / "test.yaml").write_text(yaml.safe_dump({"datasets": entries}))
    if mixtures:
        (directory / "mixtures.yaml").write_text(yaml.safe_dump({"mixtures": mixtures}))
    return directory
