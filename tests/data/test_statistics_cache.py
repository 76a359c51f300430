"""Statistics cache at scale (issue 10): ranks poll for the main process's file, fail fast on its failure marker,
and the cache lives where every node can see it."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.data.rlds_fixtures import make_episodes, write_rlds
from vla_train.data import statistics_cache as cache_module
from vla_train.data.interleave import PipelineConfig, plan_mixture
from vla_train.data.statistics_cache import StatisticsFailedError, StatisticsTimeoutError


def _config(root: Path, **kwargs) -> PipelineConfig:
    return PipelineConfig(data_root_dir=root, data_mix="ds_a", resize_resolution=(8, 8), shuffle_buffer_size=8,
                          **kwargs)


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch, tmp_path):
    monkeypatch.setattr(cache_module, "POLL_S", 0.05)
    monkeypatch.setattr(cache_module, "USER_CACHE_DIR", tmp_path / "user_cache")


def _in_thread(work):
    """Run `work` in a thread (another "rank"); returns the thread and a dict that gets `result` or `error`."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = work()
        except BaseException as error:  # handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _read_only(monkeypatch, *directories: Path) -> None:
    """Make `directories` unwritable for the cache (the tests run as root, so chmod would not do)."""
    real = cache_module._writable
    monkeypatch.setattr(cache_module, "_writable", lambda d: Path(d) not in directories and real(d))


def test_a_failure_of_the_main_process_is_raised_promptly_on_the_waiting_rank(tmp_path, fixture_registry):
    episodes = make_episodes(4, 5, seed=7)
    episodes[1]["steps"]["action"][2, 3] = np.nan
    write_rlds(tmp_path / "data", "ds_a", {"train": episodes})
    cfg = _config(tmp_path / "data")  # default statistics_timeout_s: 6 h
    waiting, outcome = _in_thread(lambda: plan_mixture(cfg, fixture_registry, is_main_process=False))
    time.sleep(1.0)
    assert waiting.is_alive()  # polling for rank 0's file
    with pytest.raises(ValueError, match="1 non-finite"):
        plan_mixture(cfg, fixture_registry, is_main_process=True)
    started = time.monotonic()
    waiting.join(timeout=30)
    assert not waiting.is_alive() and time.monotonic() - started < 30
    error = outcome["error"]
    assert isinstance(error, StatisticsFailedError)
    assert "'ds_a'" in str(error) and "ValueError: Dataset 'ds_a': 1 non-finite (NaN/inf) action values" in str(error)
    [marker] = (tmp_path / "data" / "ds_a" / "1.0.0").glob("*.failed.json")
    assert json.loads(marker.read_text())["error"] == "ValueError"
    plan = plan_mixture(_config(tmp_path / "data", drop_nonfinite=True), fixture_registry)  # another cache key
    assert plan.statistics["ds_a"]["num_trajectories"] == 3


def test_the_waiting_rank_gets_the_main_process_statistics_and_says_what_it_waits_for(
        tmp_path, fixture_registry, monkeypatch, log_records):
    dataset_dir = write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=1)})
    monkeypatch.setattr(cache_module, "MESSAGE_EVERY_S", 0.2)
    cfg = _config(tmp_path / "data")
    waiting, outcome = _in_thread(lambda: plan_mixture(cfg, fixture_registry, is_main_process=False))
    time.sleep(1.0)
    main = plan_mixture(cfg, fixture_registry, is_main_process=True)
    waiting.join(timeout=30)
    assert outcome["result"].statistics == main.statistics
    [cache] = dataset_dir.glob("dataset_statistics_*.json")
    messages = [r.getMessage() for r in log_records.records if "Waiting for the main process" in r.getMessage()]
    assert len(messages) >= 2 and f"dataset 'ds_a': expecting {cache}" in messages[0]
    assert "statistics_timeout_s=21600" in messages[0]


def test_the_waiting_rank_times_out_naming_the_file_and_the_option(tmp_path, fixture_registry):
    dataset_dir = write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=1)})
    started = time.monotonic()
    with pytest.raises(StatisticsTimeoutError) as error:
        plan_mixture(_config(tmp_path / "data", statistics_timeout_s=0.5), fixture_registry, is_main_process=False)
    assert 0.5 <= time.monotonic() - started < 10
    assert str(dataset_dir / "dataset_statistics_") in str(error.value)
    assert "statistics_timeout_s (now 0.5)" in str(error.value) and "compute_statistics.py" in str(error.value)


def test_an_earlier_runs_failure_marker_is_ignored(tmp_path, fixture_registry):
    dataset_dir = write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=1)})
    cfg = _config(tmp_path / "data", statistics_timeout_s=0.5)
    fingerprint = _fingerprint(dataset_dir, fixture_registry)
    marker = dataset_dir / f"dataset_statistics_{fingerprint}.failed.json"
    old = time.time() - cache_module.MARKER_CLOCK_SLACK_S - 3600
    marker.write_text(json.dumps({"error": "ValueError", "message": "old", "time": old}))
    with pytest.raises(StatisticsTimeoutError):  # not StatisticsFailedError
        plan_mixture(cfg, fixture_registry, is_main_process=False)
    marker.write_text(json.dumps({"error": "ValueError", "message": "now", "time": time.time()}))
    with pytest.raises(StatisticsFailedError, match="ValueError: now"):
        plan_mixture(cfg, fixture_registry, is_main_process=False)
    plan_mixture(cfg, fixture_registry, is_main_process=True)  # succeeds and removes the marker
    assert not marker.exists()
    assert plan_mixture(cfg, fixture_registry, is_main_process=False).statistics


def _fingerprint(dataset_dir: Path, registry) -> str:
    from vla_train.data.rlds import open_builder
    from vla_train.data.statistics_source import statistics_key

    return statistics_key(open_builder(dataset_dir), registry.dataset("ds_a"), dataset_dir, False)[1]


# --- where the cache lives -------------------------------------------------------------------------------------------


def test_statistics_cache_dir_holds_the_cache(tmp_path, fixture_registry, monkeypatch):
    dataset_dir = write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=2)})
    cfg = _config(tmp_path / "data", statistics_cache_dir=tmp_path / "shared")
    first = plan_mixture(cfg, fixture_registry).statistics
    [cache] = (tmp_path / "shared" / "ds_a").glob("dataset_statistics_*.json")
    assert cache.name == f"dataset_statistics_{_fingerprint(dataset_dir, fixture_registry)}.json"
    assert not list(dataset_dir.glob("dataset_statistics_*"))

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed although statistics_cache_dir holds the cache")

    monkeypatch.setattr("vla_train.data.interleave.read_statistics_parts", no_recompute)
    assert plan_mixture(cfg, fixture_registry, is_main_process=False).statistics == first
    _read_only(monkeypatch, tmp_path / "shared" / "ds_a")
    cache.unlink()
    with pytest.raises(PermissionError, match=f"statistics_cache_dir {tmp_path / 'shared'}: cannot write"):
        plan_mixture(cfg, fixture_registry)


@pytest.mark.parametrize("is_main_process", [True, False])
def test_a_read_only_dataset_dir_in_a_multi_node_run_is_an_error_on_every_rank(tmp_path, fixture_registry,
                                                                                monkeypatch, is_main_process):
    dataset_dir = write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=3)})
    _read_only(monkeypatch, dataset_dir)
    # a node-local cache from an earlier single-node run does not count: the other nodes cannot see it
    plan_mixture(_config(tmp_path / "data"), fixture_registry)
    assert list(cache_module.USER_CACHE_DIR.glob("dataset_statistics_*.json"))
    cfg = _config(tmp_path / "data", rank=0 if is_main_process else 5, world_size=8, local_world_size=4)
    started = time.monotonic()
    with pytest.raises(PermissionError) as error:
        plan_mixture(cfg, fixture_registry, is_main_process=is_main_process)
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert f"Dataset 'ds_a': its directory {dataset_dir} is read-only" in message
    assert "Set statistics_cache_dir to a directory every node shares" in message
    plan = plan_mixture(_config(tmp_path / "data", world_size=8, local_world_size=4,
                                statistics_cache_dir=tmp_path / "shared"), fixture_registry)
    assert plan.statistics["ds_a"]["num_trajectories"] == 3


def test_a_read_only_dataset_dir_in_a_single_node_run_falls_back_with_a_warning(tmp_path, fixture_registry,
                                                                                 monkeypatch, log_records):
    dataset_dir = write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=4)})
    _read_only(monkeypatch, dataset_dir)
    cfg = _config(tmp_path / "data", rank=0, world_size=4, local_world_size=4)
    main = plan_mixture(cfg, fixture_registry)
    assert list(cache_module.USER_CACHE_DIR.glob("dataset_statistics_*.json"))
    assert f"{dataset_dir} is read-only; caching its statistics in the node-local" in log_records.text
    assert plan_mixture(cfg, fixture_registry, is_main_process=False).statistics == main.statistics


def test_multi_node_comes_from_local_world_size_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert not _config(tmp_path, world_size=8).multi_node
    assert _config(tmp_path, world_size=8, local_world_size=4).multi_node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _config(tmp_path, world_size=8).multi_node
    assert not _config(tmp_path, world_size=8, local_world_size=8).multi_node
