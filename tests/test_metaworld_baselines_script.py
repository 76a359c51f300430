"""benchmarks/metaworld_baselines.py: the mean-action policy from a run's statistics, the expert baseline from the
evaluation seeds (spawned workers), and the table/JSON of both."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TASK = "handle-press-v3"  # the expert succeeds within ~30-40 steps


@pytest.fixture
def script(monkeypatch):
    # importable by name: spawned workers unpickle its worker function by module name
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("metaworld_baselines")


def fake_statistics() -> dict:
    return {"metaworld_handle_press_v3": {"action": {"mean": [0.1, -0.2, 0.3, 0.9], "q01": [-1] * 4,
                                                     "q99": [1] * 4}},
            "metaworld_reach_v3": {"action": {"mean": [0.0, 0.5, -0.5, 1.0]}}}


def test_mean_action_policy_returns_each_tasks_mean_as_a_chunk_of_one(script):
    means = script.mean_actions(fake_statistics(), ["handle-press-v3", "reach-v3"])
    policy = script.mean_action_policy(means)
    observation = {"image": np.zeros((8, 8, 3), np.uint8), "proprio": np.zeros(4, np.float32)}
    chunks = policy([observation] * 3, ["reach-v3", "handle-press-v3", "reach-v3"])
    assert [chunk.shape for chunk in chunks] == [(1, 4)] * 3
    np.testing.assert_allclose(chunks[0][0], [0.0, 0.5, -0.5, 1.0])
    np.testing.assert_allclose(chunks[1][0], [0.1, -0.2, 0.3, 0.9])
    chunks[0][0, 0] = 9.0  # callers may modify a chunk without changing the policy
    assert policy([observation], ["reach-v3"])[0][0, 0] == 0.0
    with pytest.raises(ValueError, match="metaworld_push_v3"):
        script.mean_actions(fake_statistics(), ["push-v3"])


def test_expert_and_mean_action_baselines_run_and_report_rates(script, tmp_path, capsys):
    statistics = tmp_path / "dataset_statistics.json"
    statistics.write_text(json.dumps(fake_statistics()))
    cfg = script.BaselinesConfig(tasks=[TASK], episodes=1, max_steps=60, workers=1, image_size=16,
                                 statistics=statistics, out=tmp_path / "baselines.json")
    results = script.run_baselines(cfg)
    for name in ("expert", "mean_action"):
        entry = results[name][TASK]
        assert entry["episodes"] == 1 and 0.0 <= entry["success_rate"] <= 1.0
        assert 1 <= entry["mean_length"] <= 60 and 0.0 <= entry["ci95"][0] <= entry["ci95"][1] <= 1.0
    assert results["expert"][TASK]["successes"] == 1  # the scripted expert solves handle-press well within 60 steps
    assert results["seeds"] == [10_000]
    assert json.loads(cfg.out.read_text())["expert"][TASK]["successes"] == 1
    assert TASK in capsys.readouterr().out
