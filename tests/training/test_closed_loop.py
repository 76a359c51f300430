"""Periodic closed-loop evaluation (`vla_train/training/closed_loop.py`): the schedule, the command, the checks made
before training, and the background jobs (a fake evaluation process: the real one runs in tests/e2e/test_sim_e2e.py)."""

import json
import sys
import time
from pathlib import Path

import pytest

from vla_train.config.sim_eval import SimEvalConfig
from vla_train.config.train import TrainConfig, validate_train_config
from vla_train.training import closed_loop
from vla_train.training.closed_loop import ClosedLoopEvaluator, check_closed_loop_eval, eval_command, sim_metrics

RESULTS = {"tasks": {"reach-v3": {"success_rate": 0.5}, "push-v3": {"success_rate": 0.0}},
           "overall": {"success_rate": 0.25, "episodes": 4, "ci95": [0.05, 0.7]}, "episodes_per_s": 2.0}
# A stand-in for `python -m vla_train.sim.run_eval`: sleeps, then writes results.json (or fails with exit 3).
FAKE_EVAL = """
import json, os, sys, time
from pathlib import Path
run_dir, step, sleep, fail = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
time.sleep(sleep)
print("evaluating step", step, "RANK set:", "RANK" in os.environ)
if fail:
    print("RuntimeError: the simulator exploded", file=sys.stderr)
    sys.exit(3)
results = json.loads(sys.argv[5])
Path(run_dir, "eval", step, "results.json").write_text(json.dumps(results))
"""


def test_sim_metrics_and_schedule():
    assert sim_metrics(40, RESULTS) == {"Sim/reach-v3 Success": 0.5, "Sim/push-v3 Success": 0.0,
                                        "Sim/Average Success": 0.25, "Sim/Episodes per Second": 2.0, "Sim/Step": 40}
    evaluator = ClosedLoopEvaluator(SimEvalConfig(), 10, Path("unused"), "cpu", is_main=False)
    assert [step for step in range(1, 26) if evaluator.due(step, total_steps=25)] == [10, 20, 25]


def test_eval_command_runs_the_evaluation_module_with_every_option(tmp_path):
    cfg = SimEvalConfig(tasks=["reach-v3", "push-v3"], episodes=3, seed=2, workers=4, max_steps=80, videos_per_task=0,
                        open_loop_steps=2)
    command = eval_command(tmp_path, 500, cfg, "cuda:0")
    assert command[:3] == [sys.executable, "-m", "vla_train.sim.run_eval"]
    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert options == {"--run_dir": str(tmp_path), "--step": "500", "--tasks": '["reach-v3", "push-v3"]',
                       "--episodes": "3", "--seed": "2", "--workers": "4", "--max_steps": "80", "--device": "cuda:0",
                       "--videos_per_task": "0", "--open_loop_steps": "2"}
    # the module parses exactly these options
    import draccus

    from vla_train.sim.run_eval import EvalSimConfig

    parsed = draccus.parse(EvalSimConfig, args=command[3:])
    assert parsed.tasks == ["reach-v3", "push-v3"] and parsed.step == 500 and parsed.device == "cuda:0"


def test_checks_before_training_name_the_problem():
    names = ["metaworld_reach_v3"]
    check_closed_loop_eval(SimEvalConfig(tasks=["reach-v3"]), names, ["primary", "wrist"], probe_rendering=False)
    with pytest.raises(ValueError, match=r"no dataset for \['push-v3 \(metaworld_push_v3\)'\]"):
        check_closed_loop_eval(SimEvalConfig(tasks=["reach-v3", "push-v3"]), names, None, probe_rendering=False)
    with pytest.raises(ValueError, match=r"cameras \['primary', 'secondary'\]"):
        check_closed_loop_eval(SimEvalConfig(tasks=["reach-v3"]), names, ["primary", "secondary"],
                               probe_rendering=False)
    with pytest.raises(ValueError, match="valid names"):
        check_closed_loop_eval(SimEvalConfig(tasks=["reach-v9"]), names, None, probe_rendering=False)


@pytest.mark.parametrize("field, value, message", [("eval_interval", 0, "eval_interval = 0 must be >= 1"),
                                                   ("sim_eval.episodes", 0, "--sim_eval.episodes = 0"),
                                                   ("sim_eval.max_steps", 501, "exceeds MetaWorld's episode limit"),
                                                   ("sim_eval.tasks", ["nope-v3"], "valid names")])
def test_train_config_validates_the_evaluation_options(field, value, message):
    cfg = TrainConfig()
    cfg.vla.expected_world_size = 1
    cfg.eval_interval = 5
    if field.startswith("sim_eval."):
        setattr(cfg.sim_eval, field.removeprefix("sim_eval."), value)
    else:
        setattr(cfg, field, value)
    with pytest.raises(ValueError, match=message):
        validate_train_config(cfg, 1)


def _fake_evaluator(tmp_path, monkeypatch, *, sleep=0.0, fail_steps=()):
    def command(run_dir, step, cfg, device):
        return [sys.executable, "-c", FAKE_EVAL, str(run_dir), str(step), str(sleep),
                "1" if step in fail_steps else "0", json.dumps(RESULTS)]

    monkeypatch.setattr(closed_loop, "eval_command", command)
    monkeypatch.setenv("RANK", "0")  # torchrun's variables never reach the evaluation process
    return ClosedLoopEvaluator(SimEvalConfig(), 10, tmp_path, "cpu", is_main=True)


def _poll_until_done(evaluator, timeout=60.0):
    finished, deadline = [], time.monotonic() + timeout
    while evaluator._running is not None and time.monotonic() < deadline:
        finished += evaluator.poll()
        time.sleep(0.05)
    return finished


def test_background_evaluations_never_block_and_queue_the_newest_step(tmp_path, monkeypatch, caplog):
    evaluator = _fake_evaluator(tmp_path, monkeypatch, sleep=1.0)
    started = time.monotonic()
    evaluator.launch(10)
    evaluator.launch(20)  # waits for step 10's ...
    evaluator.launch(30)  # ... and replaces step 20, which is reported as not evaluated
    assert evaluator.poll() == [] and time.monotonic() - started < 0.9  # nothing blocked
    assert "step 20 is not evaluated" in caplog.text
    finished = _poll_until_done(evaluator)
    finished += evaluator.wait()
    assert [step for step, _ in finished] == [10, 30] and finished[0][1] == RESULTS
    assert "evaluating step 10 RANK set: False" in (tmp_path / "eval" / "10" / "eval.log").read_text()
    assert not (tmp_path / "eval" / "20").exists()


def test_a_failed_evaluation_is_logged_with_its_log_and_training_goes_on(tmp_path, monkeypatch, caplog):
    evaluator = _fake_evaluator(tmp_path, monkeypatch, fail_steps={10})
    evaluator.launch(10)
    assert evaluator.wait() == []
    assert "Closed-loop evaluation of step 10 failed (exit status 3)" in caplog.text
    assert "the simulator exploded" in caplog.text and "eval/10/eval.log" in caplog.text


def test_close_terminates_a_running_evaluation_and_non_main_ranks_start_nothing(tmp_path, monkeypatch):
    evaluator = _fake_evaluator(tmp_path, monkeypatch, sleep=60.0)
    evaluator.launch(10)
    process = evaluator._running.process
    started = time.monotonic()
    evaluator.close()
    assert process.poll() is not None and time.monotonic() - started < 20
    assert evaluator.wait() == []
    other = ClosedLoopEvaluator(SimEvalConfig(), 10, tmp_path / "other", "cpu", is_main=False)
    other.launch(10)
    assert other.poll() == [] and not (tmp_path / "other").exists()
