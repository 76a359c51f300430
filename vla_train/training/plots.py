"""PNG plots of a run directory's curves (`vla-scripts/plot_run.py`, and rank 0 at the end of training):

- `plots/loss.png`: the training loss vs step;
- `plots/l1.png`: the action L1 (normalized actions) vs step, with the mean-action baseline when logged (OFT);
- `plots/accuracy.png`: the action-token accuracy vs step (OpenVLA);
- `plots/learning_rate.png`: the learning rate vs step;
- `plots/success.png`: closed-loop success rate vs checkpoint step, one line per task plus the average with its
  95 % interval, from every `eval/<step>/results.json` (in-training and `eval_sim.py --step` evaluations), else from
  the `Sim/<task> Success` metrics.

Metrics come from the jsonl tracker's `<run_dir>/<run_id>.jsonl`. A plot whose data is absent is skipped. Figures are
built with matplotlib's object API (`Figure`, no pyplot state, no display needed) and written atomically.
"""

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from vla_train.atomic_io import atomic_write

STEP_KEY = "VLA Train/Step"
PLOTS_SUBDIR = "plots"
SIM_SUCCESS_SUFFIX = " Success"
# file name -> (title, y label, [(metric key, legend label, line style)])
CURVES: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    "loss.png": ("Training loss", "loss", [("VLA Train/Loss", "loss", "-")]),
    "l1.png": ("Action L1 (normalized actions)", "L1", [("VLA Train/L1 Loss", "policy", "-"),
                                                        ("VLA Train/Mean-Action L1 Loss", "mean-action baseline",
                                                         "--")]),
    "accuracy.png": ("Action-token accuracy", "accuracy", [("VLA Train/Action Token Accuracy", "accuracy", "-")]),
    "learning_rate.png": ("Learning rate", "learning rate", [("VLA Train/Learning Rate", "learning rate", "-")]),
}


def metrics_file(run_dir: Path) -> Path | None:
    """The run's metrics jsonl: `<run_dir>/<run dir name>.jsonl`, else the one other `*.jsonl` there."""
    path = run_dir / f"{run_dir.name}.jsonl"
    if path.is_file():
        return path
    others = [p for p in run_dir.glob("*.jsonl") if p.name != "run-metrics.jsonl"]
    return others[0] if len(others) == 1 else None


def read_series(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """`{metric: [(step, value), ...]}` sorted by step, from the metrics jsonl (unreadable lines skipped)."""
    path = metrics_file(run_dir)
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    if path is None:
        return {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        step = record.get(STEP_KEY)
        for key, value in record.items():
            if key != STEP_KEY and isinstance(value, int | float) and step is not None:
                series[key].append((float(step), float(value)))
    return {key: sorted(points) for key, points in series.items()}


def read_eval_results(run_dir: Path) -> dict[int, dict[str, Any]]:
    """`{step: results}` of every `eval/<step>/results.json` (`eval/latest` has no step and is left out)."""
    found = {}
    for path in (run_dir / "eval").glob("*/results.json"):
        if path.parent.name.isdigit():
            found[int(path.parent.name)] = json.loads(path.read_text())
    return dict(sorted(found.items()))


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    return path


def _curve(series: dict[str, list[tuple[float, float]]], name: str, out_dir: Path) -> Path | None:
    title, ylabel, lines = CURVES[name]
    present = [(key, label, style) for key, label, style in lines if series.get(key)]
    if not present:
        return None
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for key, label, style in present:
        steps, values = zip(*series[key], strict=True)
        axes.plot(steps, values, style, label=label)
    axes.set(title=title, xlabel="step", ylabel=ylabel)
    if name == "learning_rate.png":
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if len(present) > 1:
        axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, out_dir / name)


def success_series(run_dir: Path, series: dict[str, list[tuple[float, float]]]) \
        -> tuple[dict[str, list[tuple[float, float]]], list[tuple[float, float, float, float]]]:
    """Per-task `(step, success rate)` lines and the average's `(step, rate, ci low, ci high)`: from the
    `results.json` files, else from the `Sim/<task> Success` metrics (no interval: low = high = rate)."""
    results = read_eval_results(run_dir)
    if results:
        tasks: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for step, entry in results.items():
            for task, values in entry["tasks"].items():
                tasks[task].append((float(step), float(values["success_rate"])))
        average = [(float(step), float(entry["overall"]["success_rate"]), *map(float, entry["overall"]["ci95"]))
                   for step, entry in results.items()]
        return dict(tasks), average
    tasks = {key.removeprefix("Sim/").removesuffix(SIM_SUCCESS_SUFFIX): points for key, points in series.items()
             if key.startswith("Sim/") and key.endswith(SIM_SUCCESS_SUFFIX) and key != "Sim/Average Success"}
    average = [(step, rate, rate, rate) for step, rate in series.get("Sim/Average Success", [])]
    return tasks, average


def _success(run_dir: Path, series: dict[str, list[tuple[float, float]]], out_dir: Path) -> Path | None:
    tasks, average = success_series(run_dir, series)
    if not tasks and not average:
        return None
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for task, points in sorted(tasks.items()):
        steps, rates = zip(*points, strict=True)
        axes.plot(steps, rates, "o-", alpha=0.6, markersize=3, label=task)
    if average:
        steps, rates, lows, highs = zip(*average, strict=True)
        axes.plot(steps, rates, "s-", color="black", linewidth=2, label="average")
        axes.fill_between(steps, lows, highs, color="black", alpha=0.12, label="average 95% CI")
    axes.set(title="Closed-loop success rate", xlabel="checkpoint step", ylabel="success rate", ylim=(-0.03, 1.03))
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.grid(alpha=0.3)
    return _save(figure, out_dir / "success.png")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's plots (default into `<run_dir>/plots/`); returns the files written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory.")
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS_SUBDIR
    series = read_series(run_dir)
    written = [_curve(series, name, out) for name in CURVES] + [_success(run_dir, series, out)]
    return [path for path in written if path is not None]
