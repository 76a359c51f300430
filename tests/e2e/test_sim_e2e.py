"""The MetaWorld loop, fast (the CI variant of docs/benchmarks.md's benchmark): expert demos on 2 tasks -> a few
training steps on 2 ranks with a closed-loop evaluation every 2 steps -> results.json, GIF rollouts, `Sim/<task>
Success` metrics and PNG plots in the run directory."""

import json

import imageio.v2 as imageio

from tests.e2e.conftest import assert_ok, torchrun
from vla_train.sim.demos import make_metaworld_demos

TASKS = ["reach-v3", "button-press-topdown-v3"]


def test_demos_train_evaluate_and_plot_in_one_loop(tmp_path):
    data = tmp_path / "sim_data"
    demos = make_metaworld_demos(data, TASKS, name="ci", episodes_per_task=3, seed_start=0, image_size=64,
                                 workers=2)
    assert all(summary.successful_seeds for summary in demos.summaries)
    result = torchrun(["--vla.type", "tiny-oft-l1", "--data_root_dir", str(data), "--registry_dirs",
                       f"[{demos.registry_dir}]", "--vla.data_mix", demos.mixture, "--run_root_dir",
                       str(tmp_path / "runs"), "--run_id", "sim", "--trackers", "[jsonl]", "--log_interval", "1",
                       "--vla.policy.action_dim", "4", "--vla.policy.proprio_dim", "4", "--vla.policy.cameras",
                       "[primary]", "--vla.max_steps", "4", "--save_interval", "100", "--eval_interval", "2",
                       "--sim_eval.tasks", json.dumps(TASKS), "--sim_eval.episodes", "2", "--sim_eval.max_steps",
                       "12", "--sim_eval.workers", "2", "--sim_eval.videos_per_task", "1"], timeout=900)
    assert_ok(result)
    run_dir = tmp_path / "runs" / "sim"
    checkpoints = sorted(p.name.split("-epoch")[0] for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    assert checkpoints == ["step-000002", "step-000004"]  # evaluated steps are committed checkpoints
    for step in (2, 4):
        results = json.loads((run_dir / "eval" / str(step) / "results.json").read_text())
        assert results["step"] == step and results["policy"] == "oft" and results["cameras"] == ["primary"]
        assert set(results["tasks"]) == set(TASKS) and results["overall"]["episodes"] == 4
        for entry in results["tasks"].values():
            assert entry["seeds"] == [10000, 10001] and all(length <= 12 for length in entry["lengths"])
            (video,) = entry["videos"]
            assert len(imageio.mimread(video)) == entry["lengths"][0] + 1
    logged = [json.loads(line) for line in (run_dir / "sim.jsonl").read_text().splitlines()]
    sim_lines = {int(line["Sim/Step"]): line for line in logged if "Sim/Step" in line}
    assert sorted(sim_lines) == [2, 4]
    for step, line in sim_lines.items():
        assert line["VLA Train/Step"] == step and 0.0 <= line["Sim/Average Success"] <= 1.0
        assert {f"Sim/{task} Success" for task in TASKS} <= set(line)
    plots = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert {"loss.png", "l1.png", "learning_rate.png", "success.png"} <= plots
