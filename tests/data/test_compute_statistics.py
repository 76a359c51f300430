"""`vla-scripts/compute_statistics.py` (issue 10): parallel statistics, bit-identical to training's own pass, written
where training reads them."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.data.rlds_fixtures import make_episodes, write_registry, write_rlds
from vla_train.data import compute_statistics as script_module
from vla_train.data import statistics_cache as cache_module
from vla_train.data.compute_statistics import ComputeStatisticsConfig, plan_jobs, run
from vla_train.data.interleave import PipelineConfig, plan_mixture
from vla_train.data.registry import load_registry
from vla_train.data.rlds import open_builder
from vla_train.data.statistics_source import count_split_files

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """`multi` (3 record files, no val split: train[:95%] ends inside the last file) and `ds_a` (a val split)."""
    root = tmp_path_factory.mktemp("compute_statistics")
    write_rlds(root / "data", "multi", {"train": make_episodes(20, 6, seed=21)}, num_shards=3)
    write_rlds(root / "data", "ds_a", {"train": make_episodes(5, 4, seed=22), "val": make_episodes(2, 4, seed=23)})
    write_registry(root / "registry", {"multi": {}, "ds_a": {}}, {"mix": [["multi", 1.0], ["ds_a", 1.0]]})
    return root


def _caches(directory: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in directory.glob("*/dataset_statistics_*.json")}


def test_the_script_writes_exactly_what_training_computes(mixture, monkeypatch):
    builder = open_builder(mixture / "data" / "multi" / "1.0.0")
    assert count_split_files(builder, "train[:95%]") == 3  # read by 3 parallel tasks
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "vla-scripts" / "compute_statistics.py"), "--data_root_dir",
               str(mixture / "data"), "--data_mix", "mix", "--registry_dirs", f"[{mixture / 'registry'}]",
               "--statistics_cache_dir", str(mixture / "script"), "--num_workers", "2",
               "--import_modules", "[tests.data.rlds_fixtures]"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"multi\t{mixture / 'script' / 'multi'}" in done.stdout and "ds_a\t" in done.stdout
    script = _caches(mixture / "script")
    cfg = PipelineConfig(data_root_dir=mixture / "data", data_mix="mix", registry_dirs=(mixture / "registry",),
                         statistics_cache_dir=mixture / "training", resize_resolution=(8, 8))
    trained = plan_mixture(cfg)  # training's own single pass, into another cache directory
    assert set(script) == {"multi", "ds_a"} and script == _caches(mixture / "training")  # bit-identical
    assert script["multi"]["num_trajectories"] == 19 and script["ds_a"]["num_transitions"] == 20
    assert script["multi"]["num_labeled_transitions"] == 19 * 6
    actions = np.concatenate([e["steps"]["action"] for e in make_episodes(5, 4, seed=22)]).astype(np.float64)
    np.testing.assert_allclose(script["ds_a"]["action"]["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-12)

    def no_recompute(*args, **kwargs):
        raise AssertionError("training recomputed statistics the script had cached")

    monkeypatch.setattr("vla_train.data.interleave.read_statistics_parts", no_recompute)
    assert plan_mixture(replace(cfg, statistics_cache_dir=mixture / "script")).statistics == trained.statistics


def test_cached_datasets_are_not_recomputed(mixture, monkeypatch):
    registry = load_registry(mixture / "registry")
    cfg = ComputeStatisticsConfig(data_root_dir=mixture / "data", data_mix="mix",
                                  statistics_cache_dir=mixture / "cached")
    plan_mixture(PipelineConfig(data_root_dir=mixture / "data", data_mix="mix", statistics_cache_dir=mixture / "cached",
                                resize_resolution=(8, 8)), registry)

    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool was started although everything is cached")

    monkeypatch.setattr(script_module, "ProcessPoolExecutor", no_pool)
    paths = run(cfg, registry)
    assert paths == {name: mixture / "cached" / name / path.name for name, path in paths.items()}
    assert sorted(paths) == ["ds_a", "multi"]
    jobs, _ = plan_jobs(replace(cfg, overwrite=True), registry)
    assert [(job.spec.name, job.num_shards) for job in jobs] == [("multi", 3), ("ds_a", 1)]


def test_a_failing_dataset_is_named_and_the_others_are_still_cached(tmp_path):
    episodes = make_episodes(4, 5, seed=24)
    episodes[2]["steps"]["action"][1, 0] = np.inf
    write_rlds(tmp_path / "data", "bad", {"train": episodes})
    write_rlds(tmp_path / "data", "good", {"train": make_episodes(3, 5, seed=25)})
    registry = load_registry(write_registry(tmp_path / "registry", {"bad": {}, "good": {}}))
    cfg = ComputeStatisticsConfig(data_root_dir=tmp_path / "data", datasets=["bad", "good"], num_workers=1,
                                  import_modules=["tests.data.rlds_fixtures"])
    with pytest.raises(RuntimeError) as error:
        run(cfg, registry)
    assert "Statistics failed for 1 of 2 datasets" in str(error.value)
    assert "bad: ValueError: Dataset 'bad': 1 non-finite (NaN/inf) action values" in str(error.value)
    assert list((tmp_path / "data" / "good" / "1.0.0").glob("dataset_statistics_*.json"))
    assert not list((tmp_path / "data" / "bad" / "1.0.0").glob("dataset_statistics_*.json"))


def test_a_read_only_dataset_dir_needs_statistics_cache_dir(tmp_path, monkeypatch):
    dataset_dir = write_rlds(tmp_path / "data", "good", {"train": make_episodes(3, 5, seed=26)})
    registry = load_registry(write_registry(tmp_path / "registry", {"good": {}}))
    monkeypatch.setattr(cache_module, "_writable", lambda directory: Path(directory) != dataset_dir)
    cfg = ComputeStatisticsConfig(data_root_dir=tmp_path / "data", data_mix="good")
    with pytest.raises(PermissionError, match=f"{dataset_dir} is read-only .* Set statistics_cache_dir"):
        plan_jobs(cfg, registry)
    jobs, _ = plan_jobs(replace(cfg, statistics_cache_dir=tmp_path / "shared"), registry)
    assert [job.cache.write_dir() for job in jobs] == [tmp_path / "shared" / "good"]
    with pytest.raises(ValueError, match="Nothing to compute: pass --data_mix"):
        plan_jobs(ComputeStatisticsConfig(data_root_dir=tmp_path / "data"), registry)
