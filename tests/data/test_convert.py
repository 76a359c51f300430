"""Converter of a user's episode files (.npz / .hdf5) to RLDS, its YAML entry, the passthrough transform, errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.data.synthetic import check_standardized, run_in_graph
from vla_train.data.convert import YAML_FILENAME, convert_episodes, split_indices
from vla_train.data.registry import load_registry
from vla_train.data.standardize import get_standardize_transform
from vla_train.data.tf_setup import tf

# isort: split

import tensorflow_datasets as tfds

REPO = Path(__file__).resolve().parents[2]
NAME = "my_robot_data"


def smooth_images(rng: np.random.Generator, length: int, size: int = 32) -> np.ndarray:
    """uint8 [T, size, size, 3] gradients with a coloured square (JPEG-friendly)."""
    grid = np.linspace(0, 200, size)
    images = np.empty((length, size, size, 3), np.uint8)
    for t in range(length):
        images[t] = np.stack([grid[None, :] + 0 * grid[:, None], grid[:, None] + 0 * grid[None, :],
                              np.full((size, size), 90.0)], axis=-1).astype(np.uint8)
        x, y = rng.integers(0, size - 8, size=2)
        images[t, y:y + 8, x:x + 8] = rng.integers(0, 256, size=3)
    return images


def episode(rng: np.random.Generator, length: int, action_dim: int = 7, state_dim: int = 8) -> dict:
    actions = rng.uniform(-0.1, 0.1, size=(length, action_dim)).astype(np.float32)
    actions[:, -1] = rng.integers(0, 2, size=length)
    return {"image": smooth_images(rng, length), "wrist_image": smooth_images(rng, length), "actions": actions,
            "state": rng.normal(size=(length, state_dim)).astype(np.float32)}


def write_h5(path: Path, arrays: dict, attrs: dict | None = None) -> None:
    with h5py.File(path, "w") as file:
        for key, value in arrays.items():
            file[key] = value
        for key, value in (attrs or {}).items():
            file.attrs[key] = value


@pytest.fixture
def episodes_dir(tmp_path) -> tuple[Path, dict[str, dict]]:
    """3 .npz and 2 .hdf5 episodes; instructions as a scalar, a [T] array and an HDF5 root attribute."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "episodes"
    (directory / "more").mkdir(parents=True)
    sources = {}
    for i, length in enumerate((5, 7, 6)):
        arrays = episode(rng, length)
        arrays["instruction"] = np.array(f"pick up object {i}") if i != 1 else np.array(
            [f"step {t}" for t in range(length)])
        np.savez(directory / f"ep_{i}.npz", **arrays)
        sources[f"ep_{i}.npz"] = arrays
    arrays = episode(rng, 4)
    write_h5(directory / "ep_3.hdf5", {**arrays, "instruction": ["open", "the", "top", "drawer"]})
    sources["ep_3.hdf5"] = {**arrays, "instruction": np.array(["open", "the", "top", "drawer"])}
    arrays = episode(rng, 3)
    write_h5(directory / "more" / "ep_4.h5", arrays, attrs={"instruction": "close the drawer"})
    sources["ep_4.h5"] = {**arrays, "instruction": np.array("close the drawer")}
    return directory, sources


def read_all(dataset_dir: Path) -> dict[str, tuple[str, dict]]:
    """file name -> (split, steps batched over time as numpy)."""
    builder = tfds.builder_from_directory(str(dataset_dir))
    found = {}
    for split in builder.info.splits:
        for ep in builder.as_dataset(split=split):
            steps = tf.nest.map_structure(lambda x: x.numpy(), next(iter(ep["steps"].batch(10_000))))
            found[Path(ep["episode_metadata"]["file_path"].numpy().decode()).name] = (split, steps)
    return found


def test_converts_npz_and_hdf5_episodes(episodes_dir, tmp_path):
    directory, sources = episodes_dir
    result = convert_episodes(directory, tmp_path / "out", NAME, val_fraction=0.4, seed=1)
    assert result.dataset_dir == tmp_path / "out" / NAME / "1.0.0"
    assert result.split_sizes == {"train": 3, "val": 2}
    features = tfds.builder_from_directory(str(result.dataset_dir)).info.features["steps"].feature
    assert set(features["observation"].keys()) == {"image", "wrist_image", "state"}
    assert features["observation"]["image"].encoding_format == "jpeg"
    assert features["action"].shape == (7,) and features["action"].dtype == tf.float32
    found = read_all(result.dataset_dir)
    assert sorted(found) == sorted(sources)
    assert sorted(split for split, _ in found.values()) == ["train"] * 3 + ["val"] * 2
    for name, (_, steps) in found.items():
        source = sources[name]
        length = len(source["actions"])
        np.testing.assert_array_equal(steps["action"], source["actions"])
        np.testing.assert_array_equal(steps["observation"]["state"], source["state"])
        for key in ("image", "wrist_image"):
            difference = np.abs(steps["observation"][key].astype(np.int32) - source[key])
            assert difference.mean() < 4.0, (name, key, difference.mean())
        instruction = np.broadcast_to(source["instruction"], (length,))
        assert [s.decode() for s in steps["language_instruction"]] == [str(s) for s in instruction]
        assert steps["is_first"].tolist() == [True] + [False] * (length - 1)
        assert steps["is_last"].tolist() == [False] * (length - 1) + [True]


def test_yaml_entry_loads_into_the_registry(episodes_dir, tmp_path):
    directory, _ = episodes_dir
    result = convert_episodes(directory, tmp_path / "out", NAME, image_keys=["image", "wrist_image"])
    assert result.yaml_path == tmp_path / "out" / NAME / YAML_FILENAME
    assert result.yaml_path.read_text() == result.yaml_text
    registry_dir = tmp_path / "my_registry"
    (registry_dir / "datasets").mkdir(parents=True)
    shutil.copy(result.yaml_path, registry_dir / "datasets" / f"{NAME}.yaml")
    spec = load_registry(registry_dir).dataset(NAME)
    assert spec.standardize == "passthrough" and spec.version == "1.0.0"
    assert spec.image_obs_keys == {"primary": "image", "secondary": None, "wrist": "wrist_image"}
    assert spec.state_obs_keys == ("state",)
    assert (spec.action_encoding, spec.action_dim, spec.state_encoding) == ("EEF_POS", 7, "NONE")


def test_passthrough_transform_meets_the_contract(episodes_dir, tmp_path):
    directory, sources = episodes_dir
    result = convert_episodes(directory, tmp_path / "out", NAME)
    _, steps = read_all(result.dataset_dir)["ep_1.npz"]
    out = run_in_graph(get_standardize_transform("passthrough"), tf.nest.map_structure(tf.constant, steps))
    check_standardized(out, length=7)
    np.testing.assert_array_equal(out["action"], sources["ep_1.npz"]["actions"])
    assert set(out["observation"]) == {"image", "wrist_image", "state"}
    assert out["language_instruction"][3] == b"step 3"
    as_float64 = run_in_graph(get_standardize_transform("passthrough"),
                              {**steps, "action": tf.constant(steps["action"].astype(np.float64))})
    assert as_float64["action"].dtype == np.float32


def test_options_image_subset_default_instruction_no_state(tmp_path):
    rng = np.random.default_rng(1)
    directory = tmp_path / "episodes"
    directory.mkdir()
    for i in range(2):
        arrays = episode(rng, 4, action_dim=10)
        del arrays["state"]
        np.savez(directory / f"e{i}.npz", **arrays)
    result = convert_episodes(directory, tmp_path / "out", NAME, image_keys=["wrist_image"],
                              default_instruction="wipe the table")
    features = tfds.builder_from_directory(str(result.dataset_dir)).info.features["steps"].feature
    assert set(features["observation"].keys()) == {"wrist_image"}
    assert "EEF_R6" in result.yaml_text and "action_dim: 10" in result.yaml_text
    assert "primary: wrist_image" in result.yaml_text and "state_obs_keys: []" in result.yaml_text
    _, steps = read_all(result.dataset_dir)["e0.npz"]
    assert set(steps["language_instruction"].tolist()) == {b"wipe the table"}
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_episodes(directory, tmp_path / "out", NAME, default_instruction="x")
    convert_episodes(directory, tmp_path / "out", NAME, default_instruction="x", overwrite=True)
    assert set(read_all(result.dataset_dir)["e1.npz"][1]["language_instruction"].tolist()) == {b"x"}


def bad_episode(kind: str, rng: np.random.Generator) -> dict:
    arrays = {**episode(rng, 5), "instruction": np.array("go")}
    if kind == "missing_actions":
        del arrays["actions"]
    elif kind == "missing_image":
        del arrays["wrist_image"]
    elif kind == "lengths":
        arrays["state"] = arrays["state"][:4]
    elif kind == "image_dtype":
        arrays["image"] = arrays["image"].astype(np.float32) / 255.0
    elif kind == "image_shape":
        arrays["image"] = arrays["image"][..., 0]
    elif kind == "nan":
        arrays["actions"][0, 0], arrays["actions"][2, 3], arrays["actions"][4, 1] = np.nan, np.inf, -np.inf
    elif kind == "action_dim":
        arrays["actions"] = arrays["actions"][:, :6]
    elif kind == "instruction_length":
        arrays["instruction"] = np.array(["a", "b"])
    elif kind == "missing_state":
        del arrays["state"]
    return arrays


@pytest.mark.parametrize(("kind", "message"), [
    ("missing_actions", "missing key 'actions'"),
    ("missing_image", "missing key 'wrist_image'"),
    ("lengths", r"mismatched lengths.*'state': 4"),
    ("image_dtype", "image 'image' must be uint8 .* dtype float32"),
    ("image_shape", r"image 'image' must be uint8 \[T, H, W, 3\], got shape \(5, 32, 32\)"),
    ("nan", "3 non-finite values"),
    ("action_dim", "mixed action dims across episodes: 'actions' has 6 dims, a_good.npz has 7"),
    ("instruction_length", "mismatched lengths: 'instruction'"),
    ("missing_state", "missing key 'state'"),
])
@pytest.mark.parametrize("suffix", [".npz", ".hdf5"])
def test_bad_input_names_the_file_and_the_problem(tmp_path, kind, message, suffix):
    rng = np.random.default_rng(2)
    directory = tmp_path / "episodes"
    directory.mkdir()
    np.savez(directory / "a_good.npz", **{**episode(rng, 5), "instruction": np.array("go")})
    bad = directory / f"b_bad{suffix}"
    arrays = bad_episode(kind, rng)
    if suffix == ".npz":
        np.savez(bad, **arrays)
    else:
        write_h5(bad, {k: v for k, v in arrays.items() if k != "instruction"}, attrs={"instruction": "go"}
                 if arrays["instruction"].ndim == 0 else None)
        if arrays["instruction"].ndim:
            with h5py.File(bad, "a") as file:
                file["instruction"] = arrays["instruction"].tolist()
    with pytest.raises(ValueError, match=message) as error:
        convert_episodes(directory, tmp_path / "out", NAME, image_keys=["image", "wrist_image"])
    assert str(bad) in str(error.value)
    assert not (tmp_path / "out" / NAME).exists()  # nothing written


def test_folder_and_name_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no episodes here")
    with pytest.raises(ValueError, match=r"empty: no episode files"):
        convert_episodes(tmp_path / "empty", tmp_path / "out", NAME)
    with pytest.raises(ValueError, match="not a directory"):
        convert_episodes(tmp_path / "missing", tmp_path / "out", NAME)
    np.savez(tmp_path / "empty" / "e.npz", **{**episode(np.random.default_rng(0), 3), "instruction": np.array("go")})
    with pytest.raises(ValueError, match="lower_snake_case"):
        convert_episodes(tmp_path / "empty", tmp_path / "out", "My Data")
    with pytest.raises(ValueError, match="state_encoding must be one of"):
        convert_episodes(tmp_path / "empty", tmp_path / "out", NAME, state_encoding="EULER")
    np.savez(tmp_path / "empty" / "f.npz", actions=np.zeros((3, 7), np.float32), instruction=np.array("go"),
             image=np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"f.npz: image 'image' must be uint8"):  # keys found in e.npz apply
        convert_episodes(tmp_path / "empty", tmp_path / "out", NAME)


def test_split_indices():
    assert split_indices(40, 0.1, seed=0)["train"].__len__() == 36
    assert len(split_indices(40, 0.1, seed=0)["val"]) == 4
    assert split_indices(5, 0.0) == {"train": [0, 1, 2, 3, 4]}
    assert len(split_indices(3, 0.01)["val"]) == 1 and "val" not in split_indices(1, 0.5)
    assert split_indices(10, 0.3, seed=4) == split_indices(10, 0.3, seed=4)
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0)


def test_script_prints_the_yaml_entry(episodes_dir, tmp_path):
    directory, _ = episodes_dir
    script = [sys.executable, "vla-scripts/convert_episodes.py"]
    help_run = subprocess.run([*script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0 and "--input_dir" in help_run.stdout, help_run.stderr[-3000:]
    run = subprocess.run([*script, "--input_dir", str(directory), "--out_root", str(tmp_path / "out"), "--name", NAME,
                          "--val_fraction", "0.2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == (tmp_path / "out" / NAME / YAML_FILENAME).read_text()
    assert "standardize: passthrough" in run.stdout
    failed = subprocess.run([*script, "--input_dir", str(tmp_path / "nothing"), "--name", NAME], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "not a directory" in failed.stderr
