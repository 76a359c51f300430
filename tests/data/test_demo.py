"""Synthetic demo datasets: structure, splits, determinism, the expert's actions, idempotence and the script."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data.synthetic import run_in_graph
from vla_train.data.demo import (
    COLORS,
    DEMO_DATASETS,
    MAX_STEP,
    Z_LOW,
    Z_SLOPE,
    make_scene,
    render,
    write_demo_datasets,
)
from vla_train.data.registry import load_registry
from vla_train.data.standardize import get_standardize_transform, load_all_transforms
from vla_train.data.tf_setup import tf

# isort: split

import tensorflow_datasets as tfds

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(num_episodes=6, episode_length=8, image_size=64, seed=3)
IMAGE_KEYS = {"demo_bridge": ("image_0", "image_1"), "demo_libero": ("image", "wrist_image")}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_data")
    paths = write_demo_datasets(root, **SMALL)
    assert paths == [root / name / "1.0.0" for name in DEMO_DATASETS]
    return root


def read_episodes(directory: Path, split: str, skip_images: bool = False) -> list[dict]:
    """Episodes of a split as numpy: `steps` batched over time, plus `episode_metadata`."""
    builder = tfds.builder_from_directory(str(directory))
    decoders = None
    if skip_images:
        observation = builder.info.features["steps"]["observation"]
        keys = [key for key, feature in observation.items() if isinstance(feature, tfds.features.Image)]
        decoders = {"steps": {"observation": {key: tfds.decode.SkipDecoding() for key in keys}}}
    episodes = []
    for episode in builder.as_dataset(split=split, decoders=decoders):
        steps = next(iter(episode["steps"].batch(10_000)))
        episodes.append({"steps": tf.nest.map_structure(lambda x: x.numpy(), steps),
                         "episode_metadata": tf.nest.map_structure(lambda x: x.numpy(), episode["episode_metadata"])})
    return episodes


def all_episodes(root: Path, name: str, **kwargs) -> list[dict]:
    return [e for split in ("train", "val") for e in read_episodes(root / name / "1.0.0", split, **kwargs)]


def test_feature_structure(demo_root):
    bridge = tfds.builder_from_directory(str(demo_root / "demo_bridge" / "1.0.0")).info.features["steps"].feature
    libero = tfds.builder_from_directory(str(demo_root / "demo_libero" / "1.0.0")).info.features["steps"].feature
    for steps in (bridge, libero):
        assert set(steps.keys()) == {"observation", "action", "language_instruction", "is_first", "is_last",
                                     "is_terminal", "reward", "discount"}
        assert steps["action"].shape == (7,) and steps["action"].dtype == tf.float32
        assert isinstance(steps["language_instruction"], tfds.features.Text)
    assert set(bridge["observation"].keys()) == {"image_0", "image_1", "state"}
    assert set(libero["observation"].keys()) == {"image", "wrist_image", "state", "joint_state"}
    for steps, name in ((bridge, "demo_bridge"), (libero, "demo_libero")):
        for key in IMAGE_KEYS[name]:
            image = steps["observation"][key]
            assert isinstance(image, tfds.features.Image) and image.encoding_format == "jpeg"
            assert image.shape == (64, 64, 3)
    assert bridge["observation"]["state"].shape == (7,)
    assert libero["observation"]["state"].shape == (8,) and libero["observation"]["joint_state"].shape == (7,)


def test_split_sizes_and_flags(demo_root):
    for name in DEMO_DATASETS:
        splits = tfds.builder_from_directory(str(demo_root / name / "1.0.0")).info.splits
        assert {s: splits[s].num_examples for s in splits} == {"train": 5, "val": 1}
        episodes = all_episodes(demo_root, name, skip_images=True)
        assert sorted(e["episode_metadata"]["episode_index"] for e in episodes) == list(range(6))
        for episode in episodes:
            steps = episode["steps"]
            assert len(steps["action"]) == SMALL["episode_length"]
            assert steps["is_first"].tolist() == [True] + [False] * 7
            assert steps["is_last"].tolist() == [False] * 7 + [True]
            assert np.all(steps["discount"] == 1.0)


def expected_episode(name: str, seed: int, index: int, length: int) -> dict:
    """The expert re-derived from the scene parameters alone (not from the generator's rollout)."""
    scene = make_scene(name, seed, index)
    target = scene.object_xy[scene.target]
    ee, closed = scene.start_xy.copy(), False
    xy, moves, dz, close = [], [], [], []
    for _ in range(length):
        difference = target - ee
        arrives = bool(np.all(np.abs(difference) <= MAX_STEP))
        new = target.copy() if arrives else ee + np.clip(difference, -MAX_STEP, MAX_STEP)
        xy.append(ee)
        moves.append(new - ee)
        dz.append(Z_SLOPE * (np.linalg.norm(target - new) - np.linalg.norm(target - ee)))
        closed = closed or arrives
        close.append(closed)
        ee = new
    return {"scene": scene, "xy": np.array(xy), "moves": np.array(moves), "dz": np.array(dz), "close": np.array(close)}


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_actions_are_the_expert_of_the_scene(demo_root, name):
    grasps = 0
    for episode in all_episodes(demo_root, name):
        steps, index = episode["steps"], int(episode["episode_metadata"]["episode_index"])
        expected = expected_episode(name, SMALL["seed"], index, SMALL["episode_length"])
        scene, action, state = expected["scene"], steps["action"], steps["observation"]["state"]
        assert all(s.decode() == scene.instruction for s in steps["language_instruction"])
        assert scene.colors[scene.target] in scene.instruction and scene.colors[scene.target] in COLORS
        np.testing.assert_allclose(state[:, :2], expected["xy"], atol=1e-6)
        np.testing.assert_allclose(state[:, 2], Z_LOW + Z_SLOPE * np.linalg.norm(scene.target_xy - expected["xy"],
                                                                                 axis=1), atol=1e-6)
        np.testing.assert_allclose(state[:, 3:6], np.broadcast_to(scene.rotation, (len(state), 3)), atol=1e-6)
        np.testing.assert_allclose(action[:, :2], expected["moves"], atol=1e-6)
        np.testing.assert_allclose(action[:, 2], expected["dz"], atol=1e-6)
        assert np.all(action[:, 3:6] == 0.0) and np.all(np.abs(action[:, :2]) <= MAX_STEP + 1e-6)
        assert np.all(np.abs(action[:, 2]) < 0.015)
        # successive state differences ARE the actions (exactly: both float32)
        np.testing.assert_array_equal(state[1:, :6] - state[:-1, :6], action[:-1, :6])
        gripper_open = np.where(expected["close"], 0.0, 1.0) if name == "demo_bridge" else np.where(
            expected["close"], 1.0, -1.0)
        np.testing.assert_array_equal(action[:, 6], gripper_open)
        grasps += int(expected["close"][-1])
    assert grasps > 0  # the small data set still shows the gripper closing on arrival


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_images_show_the_scene(demo_root, name):
    episode = read_episodes(demo_root / name / "1.0.0", "train")[0]
    scene = make_scene(name, SMALL["seed"], int(episode["episode_metadata"]["episode_index"]))
    state = episode["steps"]["observation"]["state"]
    closed = state[:, 6] < 0.5 if name == "demo_bridge" else state[:, 6] < 0.02
    primary = IMAGE_KEYS[name][0]
    for t in range(len(state)):
        rendered = render(scene, state[t, :2].astype(np.float64), bool(closed[t]), 64,
                          background=(170, 140, 100) if name == "demo_bridge" else (150, 150, 150))
        decoded = episode["steps"]["observation"][primary][t]
        assert np.abs(decoded.astype(np.int32) - rendered).mean() < 6.0  # JPEG
    assert not np.array_equal(episode["steps"]["observation"][IMAGE_KEYS[name][1]][0],
                              episode["steps"]["observation"][primary][0])


@pytest.mark.parametrize(("name", "transform", "open_value"), [("demo_bridge", "bridge_orig", 1.0),
                                                               ("demo_libero", "libero_spatial_no_noops", -1.0)])
def test_registered_transform_reproduces_the_actions(demo_root, name, transform, open_value):
    if transform not in load_all_transforms():
        pytest.skip(f"transform {transform} not registered yet")
    episode = read_episodes(demo_root / name / "1.0.0", "train", skip_images=True)[0]
    raw = tf.nest.map_structure(tf.constant, episode["steps"])
    out = run_in_graph(get_standardize_transform(transform), raw)
    action = episode["steps"]["action"]
    expected_gripper = (action[:, 6] == open_value).astype(np.float32)  # standardized: 1 = open, 0 = closed
    if name == "demo_bridge":  # drops the first step, relabels from state differences, drops the last step
        np.testing.assert_array_equal(out["action"][:, :6], action[1:-1, :6])
        np.testing.assert_array_equal(out["action"][:, 6], expected_gripper[1:-1])
    else:
        np.testing.assert_array_equal(out["action"][:, :6], action[:, :6])
        np.testing.assert_array_equal(out["action"][:, 6], expected_gripper)


def test_deterministic_in_the_seed(tmp_path):
    settings = dict(num_episodes=3, episode_length=4, image_size=32)
    first = write_demo_datasets(tmp_path / "a", seed=5, **settings)
    again = write_demo_datasets(tmp_path / "b", seed=5, **settings)
    other = write_demo_datasets(tmp_path / "c", seed=6, **settings)
    for a, b, c in zip(first, again, other, strict=True):
        for split in ("train", "val"):
            ea, eb, ec = (read_episodes(p, split, skip_images=True) for p in (a, b, c))
            for x, y, z in zip(ea, eb, ec, strict=True):
                np.testing.assert_array_equal(x["steps"]["action"], y["steps"]["action"])
                for key in x["steps"]["observation"]:
                    np.testing.assert_array_equal(x["steps"]["observation"][key], y["steps"]["observation"][key])
                assert not np.array_equal(x["steps"]["action"], z["steps"]["action"])
                assert not np.array_equal(x["steps"]["observation"]["state"], z["steps"]["observation"]["state"])
    key = IMAGE_KEYS["demo_bridge"][0]
    images = [read_episodes(p[0], "train", skip_images=True)[0]["steps"]["observation"][key] for p in (first, other)]
    assert images[0][0] != images[1][0]  # encoded bytes differ with the seed
    assert make_scene("demo_bridge", 5, 0).instruction == make_scene("demo_bridge", 5, 0).instruction
    assert not np.array_equal(make_scene("demo_bridge", 5, 0).object_xy, make_scene("demo_libero", 5, 0).object_xy)


def test_idempotent_unless_overwrite(tmp_path):
    settings = dict(num_episodes=2, episode_length=4, image_size=32)
    paths = write_demo_datasets(tmp_path, seed=1, **settings)
    stamps = {p: sorted((f.name, f.stat().st_mtime_ns) for f in p.iterdir()) for p in paths}
    assert write_demo_datasets(tmp_path, seed=1, **settings) == paths
    assert write_demo_datasets(tmp_path, seed=2, **settings) == paths  # kept (with a warning)
    assert {p: sorted((f.name, f.stat().st_mtime_ns) for f in p.iterdir()) for p in paths} == stamps
    before = read_episodes(paths[0], "train", skip_images=True)[0]["steps"]["action"]
    write_demo_datasets(tmp_path, seed=2, overwrite=True, **settings)
    after = read_episodes(paths[0], "train", skip_images=True)[0]["steps"]["action"]
    assert not np.array_equal(before, after)


def test_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="episode_length"):
        write_demo_datasets(tmp_path, num_episodes=2, episode_length=2)
    with pytest.raises(ValueError, match="Unknown demo dataset"):
        write_demo_datasets(tmp_path, num_episodes=2, episode_length=4, datasets=["demo_nothing"])


def test_demo_yaml_entries_load(tmp_path):
    (tmp_path / "datasets").mkdir()
    shutil.copy(REPO / "rlds_mixtures" / "datasets" / "demo.yaml", tmp_path / "datasets" / "demo.yaml")
    if not {"bridge_orig", "libero_spatial_no_noops"} <= set(load_all_transforms()):
        pytest.skip("bridge_orig / libero transforms not registered yet")
    registry = load_registry(base_dir=tmp_path)
    bridge, libero = registry.dataset("demo_bridge"), registry.dataset("demo_libero")
    assert bridge.standardize == "bridge_orig" and libero.standardize == "libero_spatial_no_noops"
    assert bridge.image_obs_keys == {"primary": "image_0", "secondary": "image_1", "wrist": None}
    assert libero.image_obs_keys == {"primary": "image", "secondary": None, "wrist": "wrist_image"}
    for spec in (bridge, libero):
        assert spec.state_obs_keys == ("EEF_state", None, "gripper_state")
        assert (spec.state_encoding, spec.action_encoding, spec.version) == ("POS_EULER", "EEF_POS", "1.0.0")


def test_script_help_and_small_run(tmp_path):
    script = [sys.executable, "vla-scripts/make_demo_data.py"]
    help_run = subprocess.run([*script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0, help_run.stderr[-3000:]
    assert "--num_episodes" in help_run.stdout and "runs/demo_data" in help_run.stdout
    run = subprocess.run([*script, "--data_root", str(tmp_path), "--num_episodes", "3", "--episode_length", "4",
                          "--image_size", "32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in DEMO_DATASETS:
        builder = tfds.builder_from_directory(str(tmp_path / name / "1.0.0"))
        assert builder.info.splits["train"].num_examples + builder.info.splits["val"].num_examples == 3
