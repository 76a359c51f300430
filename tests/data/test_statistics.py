import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.data.rlds_fixtures import make_episodes, write_registry, write_rlds
from vla_train.data import statistics as stats_module
from vla_train.data import statistics_cache as cache_module
from vla_train.data.interleave import PipelineConfig, plan_mixture
from vla_train.data.normalize import normalize_np, normalize_tf
from vla_train.data.registry import load_registry
from vla_train.data.statistics import (
    StatisticsParts,
    compute_statistics,
    finalize_statistics,
    merge_parts,
    save_dataset_statistics,
    summarize,
)
from vla_train.data.statistics_cache import StatisticsTimeoutError
from vla_train.data.tf_setup import tf


def _config(root, mix="mix", **kwargs):
    return PipelineConfig(data_root_dir=root / "data", data_mix=mix, resize_resolution=(8, 8),
                          shuffle_buffer_size=16, **kwargs)


def _expected(actions: np.ndarray) -> dict:
    return {"mean": actions.mean(0), "std": actions.std(0), "max": actions.max(0), "min": actions.min(0),
            "q01": np.quantile(actions, 0.01, axis=0), "q99": np.quantile(actions, 0.99, axis=0)}


def test_statistics_equal_numpy_on_the_training_split_only(fixture_root, fixture_registry):
    plan = plan_mixture(_config(fixture_root), fixture_registry)
    stats_a = plan.statistics["ds_a"]
    train_actions = np.concatenate([e["steps"]["action"] for e in make_episodes(8, 5, seed=0)])
    for key, value in _expected(train_actions.astype(np.float64)).items():
        np.testing.assert_allclose(stats_a["action"][key], value, rtol=1e-6, atol=1e-6, err_msg=key)
    assert stats_a["num_transitions"] == 40 and stats_a["num_trajectories"] == 8  # the val split is excluded
    assert stats_a["action"]["mask"] == [True] * 6 + [False]
    # no val split: statistics cover train[:95%] (tfds rounds 95% of 20 episodes to 19), read here with tfds directly
    builder = tfds.builder_from_directory(str(fixture_root / "data" / "ds_b" / "1.0.0"))
    episodes = builder.as_dataset(split="train[:95%]").map(lambda e: e["steps"].batch(100).get_single_element())
    b_actions = np.concatenate([steps["action"] for steps in episodes.as_numpy_iterator()])
    assert b_actions.shape == (76, 7)
    np.testing.assert_allclose(plan.statistics["ds_b"]["action"]["q99"], _expected(b_actions)["q99"], rtol=1e-6)
    assert plan.statistics["ds_b"]["num_trajectories"] == 19


def test_statistics_are_cached_by_content_not_path(tmp_path, fixture_registry, monkeypatch):
    write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=5)})
    registry = fixture_registry
    first = plan_mixture(_config(tmp_path, "ds_a"), registry).statistics["ds_a"]
    cache_files = list((tmp_path / "data" / "ds_a" / "1.0.0").glob("dataset_statistics_*.json"))
    assert len(cache_files) == 1
    shutil.move(tmp_path / "data", tmp_path / "moved")

    def no_recompute(*args, **kwargs):
        raise AssertionError("statistics were recomputed after moving the dataset")

    monkeypatch.setattr(stats_module, "compute_statistics", no_recompute)
    monkeypatch.setattr("vla_train.data.interleave.read_statistics_parts", no_recompute)
    moved = PipelineConfig(data_root_dir=tmp_path / "moved", data_mix="ds_a", resize_resolution=(8, 8))
    assert plan_mixture(moved, registry).statistics["ds_a"]["action"]["mean"] == first["action"]["mean"]


def test_only_the_main_process_computes(tmp_path, fixture_registry, monkeypatch):
    write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=6)})
    cfg = _config(tmp_path, "ds_a", statistics_timeout_s=0.2)
    monkeypatch.setattr(cache_module, "POLL_S", 0.05)
    with pytest.raises(StatisticsTimeoutError, match="main process did not write them"):  # nobody computes
        plan_mixture(cfg, fixture_registry, is_main_process=False)
    main = plan_mixture(cfg, fixture_registry, is_main_process=True)
    worker = plan_mixture(cfg, fixture_registry, is_main_process=False)
    assert worker.statistics == main.statistics


def test_summarize_does_not_depend_on_the_order_of_the_values():
    values = np.random.default_rng(3).normal(size=(1001, 3)).astype(np.float32) * 1e3
    shuffled = values[np.random.default_rng(4).permutation(len(values))]
    assert summarize(values) == summarize(shuffled)  # bit-identical: merged parallel parts equal a single pass
    for key, value in _expected(values.astype(np.float64)).items():
        np.testing.assert_allclose(summarize(values)[key], value, rtol=1e-12, err_msg=key)


def test_parts_merge_exactly():
    episodes = make_episodes(6, 5, seed=11)
    trajectories = [{"action": e["steps"]["action"], "proprio": e["steps"]["observation"]["state"],
                     "labeled": np.arange(5) < i} for i, e in enumerate(episodes)]
    whole = compute_statistics(trajectories, "x")
    parts = [StatisticsParts(), StatisticsParts()]
    for i, trajectory in enumerate(trajectories):
        parts[i % 2].add(trajectory)
    assert finalize_statistics(merge_parts(reversed(parts)), "x") == whole
    assert (whole["num_labeled_transitions"], whole["num_labeled_trajectories"]) == (15, 5)


def test_nonfinite_actions_fail_with_a_count_or_are_dropped(tmp_path, fixture_registry):
    episodes = make_episodes(4, 5, seed=7)
    episodes[1]["steps"]["action"][2, 3] = np.nan
    episodes[2]["steps"]["action"][0, 0] = np.inf
    write_rlds(tmp_path / "data", "ds_a", {"train": episodes})
    with pytest.raises(ValueError, match="2 non-finite"):
        plan_mixture(_config(tmp_path, "ds_a"), fixture_registry)
    plan = plan_mixture(_config(tmp_path, "ds_a", drop_nonfinite=True), fixture_registry)
    assert plan.statistics["ds_a"]["num_trajectories"] == 2


def test_export_layout_matches_the_reference(tmp_path, fixture_root, fixture_registry):
    plan = plan_mixture(_config(fixture_root), fixture_registry)
    path = save_dataset_statistics(plan.statistics, tmp_path)
    content = json.loads(path.read_text())
    assert path.name == "dataset_statistics.json" and set(content) == {"ds_a", "ds_b"}
    entry = content["ds_a"]
    assert set(entry) == {"action", "proprio", "num_transitions", "num_trajectories"}
    assert set(entry["action"]) == {"mean", "std", "max", "min", "q01", "q99", "mask"}
    assert set(entry["proprio"]) == {"mean", "std", "max", "min", "q01", "q99"}
    assert len(entry["proprio"]["mean"]) == 5  # state (4) + one zero column for the null state key


def test_compute_statistics_needs_trajectories():
    with pytest.raises(ValueError, match="no trajectories"):
        compute_statistics([], "empty")


@pytest.mark.parametrize("kind", ["normal", "bounds", "bounds_q99"])
def test_normalization_tf_equals_numpy(kind):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 7)).astype(np.float32)
    stats = {k: v.tolist() for k, v in _expected(values).items()}
    stats["min"][2] = stats["max"][2] = 0.5  # a constant dimension
    stats["mask"] = [True] * 6 + [False]
    expected = normalize_np(values, stats, kind)
    np.testing.assert_allclose(normalize_tf(tf.constant(values), stats, kind).numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(expected[:, 6], values[:, 6])  # masked: unchanged
    if kind != "normal":
        assert np.all(expected[:, 2] == 0.0)  # min == max -> 0
        assert np.all(np.abs(expected[:, :6]) <= 1.0)
        low, high = np.asarray(stats["q01" if kind == "bounds_q99" else "min"]), np.asarray(
            stats["q99" if kind == "bounds_q99" else "max"])
        manual = np.clip(2 * (values[:, 0] - low[0]) / (high[0] - low[0] + 1e-8) - 1, -1, 1)
        np.testing.assert_allclose(expected[:, 0], manual, rtol=1e-5, atol=1e-6)


def test_unknown_normalization():
    with pytest.raises(ValueError, match="Unknown normalization type 'minmax'"):
        normalize_np(np.zeros((1, 2)), {}, "minmax")


def test_registry_dir_helper_writes_loadable_yaml(tmp_path):
    registry = load_registry(base_dir=write_registry(tmp_path, {"x": {}}, {"m": [["x", 1.0]]}))
    assert registry.resolve_mixture("m")[0][0].name == "x"
