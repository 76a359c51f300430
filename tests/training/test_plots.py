"""Run plots (`vla_train/training/plots.py`, `vla-scripts/plot_run.py`) from a synthetic metrics jsonl and
closed-loop results."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vla_train.training.plots import plot_run, read_series, success_series

REPO = Path(__file__).resolve().parents[2]


def _write_run(run_dir: Path, *, oft: bool = True, results: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(10, 110, 10):
        record = {"VLA Train/Step": step, "VLA Train/Loss": 1.0 / step, "VLA Train/Learning Rate": 1e-3}
        record.update({"VLA Train/L1 Loss": 0.5 - step / 1000, "VLA Train/Mean-Action L1 Loss": 0.5} if oft
                      else {"VLA Train/Action Token Accuracy": step / 100})
        lines.append(json.dumps(record))
    for step, rate in ((50, 0.25), (100, 0.75)):
        lines.append(json.dumps({"VLA Train/Step": step, "Sim/reach-v3 Success": rate, "Sim/Average Success": rate,
                                 "Sim/Step": step}))
    lines.append('{"VLA Train/Step": 1')  # a line cut by a kill
    (run_dir / f"{run_dir.name}.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "run-metrics.jsonl").write_text('{"run_id": "x", "hparams": {}}\n')
    if results:
        for step, successes in ((50, 1), (100, 3)):
            out = run_dir / "eval" / str(step)
            out.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps({
                "tasks": {"reach-v3": {"success_rate": successes / 4}, "push-v3": {"success_rate": 0.0}},
                "overall": {"success_rate": successes / 8, "ci95": [0.01, 0.6]}}))
        (run_dir / "eval" / "latest").mkdir()  # eval_sim.py without --step: no step, not plotted
        (run_dir / "eval" / "latest" / "results.json").write_text("{}")
    return run_dir


def _image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_plots_of_an_oft_run_with_closed_loop_results(tmp_path):
    run_dir = _write_run(tmp_path / "run+x7")
    written = plot_run(run_dir)
    assert sorted(p.name for p in written) == ["l1.png", "learning_rate.png", "loss.png", "success.png"]
    for path in written:
        assert path.parent == run_dir / "plots"
        pixels = _image(path)
        assert pixels.shape[0] > 200 and pixels.std() > 5  # a drawn figure, not a blank canvas
    tasks, average = success_series(run_dir, read_series(run_dir))
    assert tasks == {"reach-v3": [(50.0, 0.25), (100.0, 0.75)], "push-v3": [(50.0, 0.0), (100.0, 0.0)]}
    assert average == [(50.0, 0.125, 0.01, 0.6), (100.0, 0.375, 0.01, 0.6)]


def test_plots_fall_back_to_logged_success_and_skip_absent_curves(tmp_path):
    run_dir = _write_run(tmp_path / "run", oft=False, results=False)
    series = read_series(run_dir)
    assert series["VLA Train/Loss"][0] == (10.0, 0.1) and len(series["VLA Train/Loss"]) == 10
    tasks, average = success_series(run_dir, series)
    assert tasks == {"reach-v3": [(50.0, 0.25), (100.0, 0.75)]} and average[1] == (100.0, 0.75, 0.75, 0.75)
    written = plot_run(run_dir, tmp_path / "elsewhere")
    assert sorted(p.name for p in written) == ["accuracy.png", "learning_rate.png", "loss.png", "success.png"]
    assert all(p.parent == tmp_path / "elsewhere" for p in written)


def test_plot_run_script(tmp_path):
    run_dir = _write_run(tmp_path / "run")
    result = subprocess.run([sys.executable, "vla-scripts/plot_run.py", "--run_dir", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(run_dir / "plots" / "success.png") in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "vla-scripts/plot_run.py", "--run_dir", str(empty)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Nothing to plot" in result.stderr


def test_plot_run_refuses_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        plot_run(tmp_path / "missing")
