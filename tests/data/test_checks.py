"""Planning checks (issue 9 §4): data errors are named while planning, before statistics, streaming or any write."""

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.data.rlds_fixtures import make_episodes, write_registry, write_rlds
from tests.data.standardize import test_group_a as catalog
from vla_train.data import interleave
from vla_train.data.checks import check_dataset_keys
from vla_train.data.interleave import PipelineConfig, build_frame_dataset, plan_mixture
from vla_train.data.registry import load_registry
from vla_train.data.rlds import find_dataset_dir
from vla_train.data.standardize import STANDARDIZE_TRANSFORMS
from vla_train.data.statistics import LABEL_KEYS, statistics_fingerprint
from vla_train.data.tf_setup import tf

READS_MISSING = "__reads_a_missing_key__"


def _reads_missing(trajectory):
    return {**trajectory, "action": trajectory["action"], "depth": trajectory["observation"]["depth_image"]}


STANDARDIZE_TRANSFORMS.setdefault(READS_MISSING, _reads_missing)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """ds_a (val split), ds_b (20 episodes), small (10 episodes, no val: empty train[95%:]), unlabeled."""
    root = tmp_path_factory.mktemp("checks") / "data"
    write_rlds(root, "ds_a", {"train": make_episodes(8, 5, seed=0), "val": make_episodes(2, 5, seed=1)})
    write_rlds(root, "ds_b", {"train": make_episodes(20, 3, seed=2)})
    write_rlds(root, "small", {"train": make_episodes(10, 3, seed=3)})
    write_rlds(root, "unlabeled", {"train": make_episodes(3, 4, seed=4, instruction="")})
    return root


def _registry(directory: Path, datasets: dict, mixtures: dict | None = None):
    return load_registry(base_dir=write_registry(directory, datasets, mixtures))


def _config(data_root: Path, mix: str, **kwargs) -> PipelineConfig:
    return PipelineConfig(data_root_dir=data_root, data_mix=mix, resize_resolution=(8, 8), shuffle_buffer_size=8,
                          deterministic=True, **kwargs)


@pytest.fixture
def no_statistics(monkeypatch):
    """Fail the test if planning reaches the statistics (the checks must come first)."""

    def fail(*args, **kwargs):
        raise AssertionError("statistics were read or computed before the checks")

    monkeypatch.setattr(interleave, "load_or_compute_statistics", fail)


# --- keys: camera / state keys of the YAML entry and keys the standardization transform reads ----------------------


def test_a_configured_camera_key_missing_from_the_features_is_named(tmp_path, data_root, no_statistics):
    registry = _registry(tmp_path, {"ds_a": {}, "ds_b": {"image_obs_keys": {"primary": "image",
                                                                            "secondary": "image_1"}}},
                         {"mix": [["ds_a", 1.0], ["ds_b", 1.0]]})
    with pytest.raises(ValueError) as error:
        plan_mixture(_config(data_root, "mix"), registry)
    message = str(error.value)
    assert "Dataset 'ds_b'" in message and str(data_root / "ds_b" / "1.0.0") in message
    assert "image_obs_keys.secondary: 'image_1'" in message
    assert "['image', 'state', 'wrist']" in message  # the keys present


def test_missing_state_and_depth_keys_are_all_named(tmp_path, data_root, no_statistics):
    registry = _registry(tmp_path, {"ds_a": {"state_obs_keys": ["state", "joint_state"],
                                             "depth_obs_keys": {"primary": "depth"}}})
    with pytest.raises(ValueError, match=r"depth_obs_keys.primary: 'depth'; state_obs_keys\[1\]: 'joint_state'"):
        plan_mixture(_config(data_root, "ds_a"), registry)


def test_a_key_the_standardization_transform_reads_is_named(tmp_path, data_root, no_statistics):
    registry = _registry(tmp_path, {"ds_a": {"standardize": READS_MISSING}})
    with pytest.raises(ValueError) as error:
        plan_mixture(_config(data_root, "ds_a"), registry)
    message = str(error.value)
    assert f"standardization transform {READS_MISSING!r} reads 'depth_image'" in message
    assert str(data_root / "ds_a" / "1.0.0") in message and "'observation/image'" in message
    assert not isinstance(error.value, KeyError)


def _element_spec(structure):
    """The element spec the RLDS reader gives a dataset with this (catalog) feature structure."""
    if isinstance(structure, dict):
        return {key: _element_spec(value) for key, value in structure.items()}
    dtype = tf.string if structure.dtype in ("image", "string") else tf.as_dtype(structure.dtype)
    return tf.TensorSpec((None, *structure.shape), dtype)


CATALOG = {"bridge_oxe": catalog.BRIDGE_OXE, "bridge_orig": catalog.BRIDGE_ORIG,
           "fractal20220817_data": catalog.FRACTAL, "kuka": catalog.KUKA, "taco_play": catalog.TACO_PLAY,
           "jaco_play": catalog.JACO_PLAY, "berkeley_cable_routing": catalog.CABLE_ROUTING,
           "roboturk": catalog.ROBOTURK, "viola": catalog.VIOLA, "berkeley_autolab_ur5": catalog.UR5,
           "toto": catalog.TOTO, "language_table": catalog.LANGUAGE_TABLE,
           "stanford_hydra_dataset_converted_externally_to_rlds": catalog.HYDRA}


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_oxe_entries_match_their_catalog_features(name):
    spec = load_registry().dataset(name)
    check_dataset_keys(spec, _element_spec(CATALOG[name]), Path("/data") / name)


def test_bridge_oxe_with_the_reference_secondary_camera_is_refused():
    spec = load_registry().dataset("bridge_oxe")
    reference = replace(spec, image_obs_keys={"primary": "image", "secondary": "image_1", "wrist": None})
    with pytest.raises(ValueError, match=r"'bridge_oxe' at /data/bridge/0.1.0: .*image_obs_keys.secondary: "
                                         r"'image_1'.*features.json observation: \['image', "):
        check_dataset_keys(reference, _element_spec(CATALOG["bridge_oxe"]), Path("/data/bridge/0.1.0"))


def test_a_standardized_action_of_the_wrong_width_is_named_before_statistics(tmp_path, data_root, no_statistics):
    registry = _registry(tmp_path, {"ds_a": {"action_dim": 6}})
    with pytest.raises(ValueError, match=r"shape \[None, 7\], but its YAML entry says action_dim=6"):
        plan_mixture(_config(data_root, "ds_a"), registry)


# --- language instructions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["unlabeled", "mix"])
def test_a_training_split_without_instructions_is_refused(tmp_path, data_root, mix):
    registry = _registry(tmp_path, {"ds_a": {}, "unlabeled": {}}, {"mix": [["ds_a", 1.0], ["unlabeled", 1.0]]})
    with pytest.raises(ValueError) as error:
        plan_mixture(_config(data_root, mix), registry)
    message = str(error.value)
    assert "Dataset 'unlabeled'" in message and str(data_root / "unlabeled" / "1.0.0") in message
    assert "none of the 12 steps (3 trajectories)" in message and "language instruction" in message
    plan = plan_mixture(_config(data_root, mix, skip_unlabeled=False), registry)  # then nothing is filtered out
    assert set(plan.statistics["unlabeled"]) == {"action", "proprio", "num_transitions", "num_trajectories"}


def test_a_cache_without_the_label_counts_is_recomputed(tmp_path, log_records):
    dataset_dir = write_rlds(tmp_path / "data", "quiet", {"train": make_episodes(3, 4, seed=5, instruction="")})
    registry = _registry(tmp_path / "registry", {"quiet": {}})
    plan_mixture(_config(tmp_path / "data", "quiet", skip_unlabeled=False), registry)
    [cache] = dataset_dir.glob("dataset_statistics_*.json")
    content = json.loads(cache.read_text())
    assert (content[LABEL_KEYS[0]], content[LABEL_KEYS[1]]) == (0, 0)
    cache.write_text(json.dumps({k: v for k, v in content.items() if k not in LABEL_KEYS}))  # an older version's
    with pytest.raises(ValueError, match="'quiet' at .* none of the 12 steps"):
        plan_mixture(_config(tmp_path / "data", "quiet"), registry)
    assert "lacks ['num_labeled_transitions', 'num_labeled_trajectories']" in log_records.text
    assert LABEL_KEYS[0] in json.loads(cache.read_text())  # rewritten


def test_label_counts_are_cached_and_not_exported(tmp_path, data_root):
    registry = _registry(tmp_path, {"ds_a": {}})
    plan = plan_mixture(_config(data_root, "ds_a"), registry)
    assert LABEL_KEYS[0] not in plan.statistics["ds_a"]
    caches = [json.loads(path.read_text()) for path in (data_root / "ds_a" / "1.0.0").glob("dataset_statistics_*")]
    assert [(c[LABEL_KEYS[0]], c[LABEL_KEYS[1]]) for c in caches] == [(40, 8)]


# --- missing mixture members -----------------------------------------------------------------------------------------


def _members_registry(directory: Path):
    return _registry(directory, {"ds_a": {}, "ds_b": {}, "ghost": {}, "phantom": {"version": "2.0.0"}, "lone": {}},
                     {"mix": [["ds_a", 1.0], ["ghost", 1.0], ["ds_b", 3.0], ["phantom", 1.0]],
                      "gone": [["ghost", 1.0], ["phantom", 1.0]]})


def test_every_missing_member_is_named_with_the_path_looked_at(tmp_path, data_root, no_statistics):
    with pytest.raises(FileNotFoundError) as error:
        plan_mixture(_config(data_root, "mix"), _members_registry(tmp_path))
    message = str(error.value)
    assert "2 of its 4 datasets are missing" in message
    assert f"ghost: looked for {data_root / 'ghost'}" in message
    assert f"phantom: looked for {data_root / 'phantom' / '2.0.0'}" in message
    assert "allow_missing_datasets=True" in message and "ds_a, ds_b" in message


def test_allow_missing_datasets_trains_on_the_members_present(tmp_path, data_root, log_records):
    registry = _members_registry(tmp_path)
    plan = plan_mixture(_config(data_root, "mix", allow_missing_datasets=True), registry)
    assert [spec.name for spec in plan.specs] == ["ds_a", "ds_b"]
    assert plan.dataset_dirs == [find_dataset_dir(data_root, spec) for spec in plan.specs]
    raw = np.array([1.0, 3.0]) * plan.dataset_sizes
    np.testing.assert_allclose(plan.weights, raw / raw.sum())
    warning = next(r.message for r in log_records.records if r.levelno == logging.WARNING and r.name == "vla_train")
    assert "ghost" in warning and "phantom" in warning and "ds_a 0.2500, ds_b 0.7500" in warning
    with pytest.raises(FileNotFoundError, match="None of its datasets is present"):
        plan_mixture(_config(data_root, "gone", allow_missing_datasets=True), registry)
    with pytest.raises(FileNotFoundError, match="Dataset 'lone' not found: looked for"):  # a single dataset
        plan_mixture(_config(data_root, "lone", allow_missing_datasets=True), registry)


# --- held-out split --------------------------------------------------------------------------------------------------


def test_the_plan_knows_which_datasets_have_held_out_episodes(tmp_path, data_root):
    registry = _registry(tmp_path, {"ds_a": {}, "ds_b": {}, "small": {}},
                         {"mix": [["small", 1.0], ["ds_a", 1.0]], "b": [["ds_b", 1.0]]})
    cfg = _config(data_root, "mix")
    plan = plan_mixture(cfg, registry)
    assert plan.held_out_episodes == [0, 2]
    assert plan.without_held_out() == [f"small ({data_root / 'small' / '1.0.0'})"]
    assert plan.has_held_out(1) and plan.has_held_out(2) and not plan.has_held_out(3)
    frames = list(build_frame_dataset(replace(cfg, train=False), plan).as_numpy_iterator())
    assert len(frames) == 10 and {f["dataset_name"] for f in frames} == {b"ds_a"}  # ds_a's val split only
    small = plan_mixture(_config(data_root, "small"), registry)
    assert not small.has_held_out(1)
    with pytest.raises(ValueError, match="No held-out episodes to evaluate on: .*small"):
        build_frame_dataset(_config(data_root, "small", train=False), small)
    b = plan_mixture(_config(data_root, "b"), registry)
    assert b.held_out_episodes == [1] and b.has_held_out(1) and not b.has_held_out(2)


# --- statistics cache key --------------------------------------------------------------------------------------------


def test_the_cache_key_covers_the_record_files(tmp_path, fixture_registry):
    dataset_dir = write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=8)})
    spec = fixture_registry.dataset("ds_a")
    before = statistics_fingerprint(dataset_dir, spec, "train[:95%]")
    [record] = dataset_dir.glob("*.tfrecord*")
    status = record.stat()
    os.utime(record, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    assert statistics_fingerprint(dataset_dir, spec, "train[:95%]") != before
    os.utime(record, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert statistics_fingerprint(dataset_dir, spec, "train[:95%]") == before
    shutil.move(tmp_path / "data", tmp_path / "moved")  # a move keeps sizes and times, hence the key
    assert statistics_fingerprint(tmp_path / "moved" / "ds_a" / "1.0.0", spec, "train[:95%]") == before


def test_replaced_records_invalidate_the_cached_statistics(tmp_path, fixture_registry):
    dataset_dir = write_rlds(tmp_path / "old", "ds_a", {"train": make_episodes(4, 4, seed=9)})
    new_dir = write_rlds(tmp_path / "new", "ds_a", {"train": make_episodes(4, 4, seed=10)})
    before = plan_mixture(_config(tmp_path / "old", "ds_a"), fixture_registry).statistics["ds_a"]
    [old_record], [new_record] = dataset_dir.glob("*.tfrecord*"), new_dir.glob("*.tfrecord*")
    shutil.copyfile(new_record, old_record)  # new data, same metadata files (dataset_info.json, features.json)
    after = plan_mixture(_config(tmp_path / "old", "ds_a"), fixture_registry).statistics["ds_a"]
    expected = plan_mixture(_config(tmp_path / "new", "ds_a"), fixture_registry).statistics["ds_a"]
    assert after["action"]["mean"] != before["action"]["mean"]
    assert after["action"]["mean"] == expected["action"]["mean"]
