"""Closed-loop MetaWorld evaluation (`vla_train.sim.evaluate`) with fake policies in the parent and environments in
spawned workers; and `vla-scripts/eval_sim.py` end to end on a tiny OFT run directory."""

import json
import math

import imageio.v2 as imageio
import numpy as np
import pytest

from vla_train.sim.evaluate import evaluate_policy, results_table, wilson_interval
from vla_train.sim.metaworld_env import EVAL_SEED_START

SIZE = 64
TASKS = ["reach-v3", "button-press-topdown-v3"]
MAX_STEPS = 7


class ConstantChunks:
    """Returns chunks `[H, 4]` of one constant action (dataset convention), counting calls and batch sizes."""

    def __init__(self, horizon: int) -> None:
        self.horizon, self.calls, self.batches = horizon, 0, []

    def __call__(self, observations, tasks):
        assert len(observations) == len(tasks)
        for obs in observations:
            assert obs["image"].shape == (SIZE, SIZE, 3) and obs["image"].dtype == np.uint8
            assert obs["wrist_image"].shape == (SIZE, SIZE, 3) and obs["proprio"].shape == (4,)
        self.calls += len(observations)
        self.batches.append(len(observations))
        return [np.tile(np.array([0.0, 0.0, 0.0, 1.0], np.float32), (self.horizon, 1)) for _ in observations]


def test_wilson_interval_matches_a_hand_computation():
    # 3 of 4: p = .75, z^2 = 3.8415; centre = (.75 + .4802) / 1.9604 = .6275; half = 1.96 / 1.9604 *
    # sqrt(.046875 + .060017) = .3268 -> [.3006, .9544]
    low, high = wilson_interval(3, 4)
    assert low == pytest.approx(0.3006, abs=2e-4) and high == pytest.approx(0.9544, abs=2e-4)
    assert wilson_interval(0, 2)[0] == 0.0 and wilson_interval(0, 2)[1] == pytest.approx(0.6576, abs=2e-4)
    assert wilson_interval(2, 2)[1] == 1.0 and wilson_interval(2, 2)[0] == pytest.approx(0.3424, abs=2e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("open_loop_steps, horizon", [(3, 5), (1, 1)])
def test_evaluate_policy_results_seeds_and_open_loop_chunks(tmp_path, open_loop_steps, horizon):
    policy = ConstantChunks(horizon)
    videos = tmp_path / "videos" if open_loop_steps == 3 else None
    results = evaluate_policy(policy, TASKS, 2, seed=1, workers=2, image_size=SIZE, max_steps=MAX_STEPS,
                              open_loop_steps=open_loop_steps, video_dir=videos, videos_per_task=1)
    assert set(results["tasks"]) == set(TASKS)
    all_seeds = []
    for task in TASKS:
        entry = results["tasks"][task]
        assert entry["episodes"] == 2 and entry["seeds"] == [EVAL_SEED_START + 100000 + i for i in range(2)]
        assert all(seed >= EVAL_SEED_START for seed in entry["seeds"])
        assert entry["lengths"] == [MAX_STEPS, MAX_STEPS] and entry["success_flags"] == [False, False]
        assert entry["policy_calls"] == [math.ceil(MAX_STEPS / open_loop_steps)] * 2
        assert entry["success_rate"] == 0.0 and entry["ci95"] == pytest.approx(list(wilson_interval(0, 2)))
        all_seeds.append(set(entry["seeds"]))
        if videos is not None:
            assert len(entry["videos"]) == 1
            frames = imageio.mimread(entry["videos"][0])
            assert len(frames) == MAX_STEPS + 1 and frames[0].shape[:2] == (SIZE, SIZE)
            assert frames[-1][0, 0, 0] > 150 and frames[-1][0, 0, 1] < 50  # red border: failure
    assert len(all_seeds[0]) == 2 and len(all_seeds[1]) == 2
    assert policy.calls == 4 * math.ceil(MAX_STEPS / open_loop_steps)
    assert max(policy.batches) == 2  # both workers' environments planned in one batch
    overall = results["overall"]
    assert overall["episodes"] == 4 and overall["successes"] == 0 and results["episodes_per_s"] > 0
    assert "overall" in results_table(results)


def test_evaluate_policy_rejects_bad_tasks_and_chunks():
    with pytest.raises(ValueError, match="reach-v3"):
        evaluate_policy(ConstantChunks(1), ["not-a-task"], 1, 0, workers=1, image_size=SIZE, max_steps=2,
                        open_loop_steps=1)
    with pytest.raises(ValueError, match=r"\[H, 4\]"):
        evaluate_policy(lambda obs, tasks: [np.zeros((2, 7))] * len(obs), ["reach-v3"], 1, 0, workers=1,
                        image_size=SIZE, max_steps=2, open_loop_steps=1)


# ------------------------------------------------------------------------------------------ eval_sim.py end to end
OFT_MODEL_ID = "tiny-dinosiglip+tiny-llama"  # its vision backbone reads 64 px images


def _load_eval_script():
    """`vla-scripts/eval_sim.py`'s implementation (the script runs `vla_train.sim.run_eval.main`)."""
    from vla_train.sim import run_eval

    return run_eval


def _stats(dim: int) -> dict:
    return {"q01": [-1.0] * dim, "q99": [1.0] * dim, "min": [-1.0] * dim, "max": [1.0] * dim,
            "mask": [True] * (dim - 1) + [False]}


@pytest.fixture(scope="module")
def oft_run(tmp_path_factory):
    from vla_train.config.policy import OFTPolicyConfig
    from vla_train.export.oft_run import write_tiny_oft_run

    policy = OFTPolicyConfig(head="l1", chunk_length=3, action_dim=4, proprio_dim=4, cameras=["primary", "wrist"])
    stats = {"metaworld_reach_v3": {"action": _stats(4), "proprio": {**_stats(4), "mask": [True] * 4}}}
    return write_tiny_oft_run(OFT_MODEL_ID, tmp_path_factory.mktemp("eval") / "run", policy, norm_stats=stats)


def test_eval_sim_end_to_end_writes_results_and_a_video(oft_run, capsys):
    script = _load_eval_script()
    cfg = script.EvalSimConfig(run_dir=oft_run, tasks=["reach-v3"], episodes=1, workers=1, max_steps=5,
                               videos_per_task=1)
    results = script.run_eval(cfg)
    written = json.loads((oft_run / "eval" / "latest" / "results.json").read_text())
    entry = written["tasks"]["reach-v3"]
    assert written["policy"] == "oft" and written["open_loop_steps"] == 3 and written["image_size"] == 64
    assert entry["episodes"] == 1 and entry["lengths"][0] <= 5 and entry["policy_calls"] == [2]
    assert entry["seeds"] == [EVAL_SEED_START] and results["overall"]["episodes"] == 1
    frames = imageio.mimread(entry["videos"][0])
    assert len(frames) == entry["lengths"][0] + 1
    assert "reach-v3" in capsys.readouterr().out


def test_eval_sim_refuses_bad_tasks_image_sizes_and_missing_statistics(oft_run):
    script = _load_eval_script()
    with pytest.raises(ValueError, match="valid names"):
        script.run_eval(script.EvalSimConfig(run_dir=oft_run, tasks=["reach-v9"]))
    with pytest.raises(ValueError, match=r"128x128.*64x64"):
        script.run_eval(script.EvalSimConfig(run_dir=oft_run, tasks=["reach-v3"], image_size=128))
    with pytest.raises(ValueError, match="metaworld_push_v3"):
        script.run_eval(script.EvalSimConfig(run_dir=oft_run, tasks=["push-v3"]))


def test_success_marker_colours_the_last_frames_only():
    from vla_train.sim.evaluate import MARKER_FRAMES, mark_frames

    frames = [np.zeros((SIZE, SIZE, 3), np.uint8) for _ in range(MARKER_FRAMES + 2)]
    marked = mark_frames(frames, success=True)
    assert marked[-1][0, 0].tolist() == [0, 200, 0] and marked[-1][SIZE // 2, SIZE // 2].tolist() == [0, 0, 0]
    assert not marked[1].any() and not frames[-1].any()  # earlier frames and the inputs untouched
    assert mark_frames(frames, success=False)[-1][0, 0].tolist() == [220, 0, 0]


def test_eval_sim_runs_an_openvla_policy_one_action_per_step(tmp_path):
    """The discrete-token OpenVLA policy in closed loop: one action per call, re-planned every step."""
    from vla_train.config.model import get_model_config
    from vla_train.export.compat import write_tiny_vla_run

    stats = {"metaworld_reach_v3": {"action": _stats(4)}}
    run_dir = write_tiny_vla_run(get_model_config(OFT_MODEL_ID), tmp_path / "openvla_run", norm_stats=stats)
    script = _load_eval_script()
    results = script.run_eval(script.EvalSimConfig(run_dir=run_dir, step=2, tasks=["reach-v3"], episodes=1,
                                                   workers=1, max_steps=3, videos_per_task=0))
    entry = results["tasks"]["reach-v3"]
    assert results["policy"] == "openvla" and results["chunk_length"] == 1 and results["open_loop_steps"] == 1
    assert entry["lengths"] == [3] and entry["policy_calls"] == [3] and entry["videos"] == []
    assert (run_dir / "eval" / "2" / "results.json").is_file()
    with pytest.raises(ValueError, match=r"--open_loop_steps 2 must be in \[1, 1\]"):
        script.run_eval(script.EvalSimConfig(run_dir=run_dir, tasks=["reach-v3"], open_loop_steps=2))
