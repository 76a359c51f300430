"""PNG plots of a run: loss, action L1 / token accuracy, learning rate, closed-loop success rate vs step.

Reads the run's metrics jsonl and its `eval/<step>/results.json` files and writes
`<run_dir>/plots/{loss,l1,accuracy,learning_rate,success}.png` (those with data; `vla_train/training/plots.py`).
Training writes them at its end too.

Usage: python vla-scripts/plot_run.py --run_dir runs/<run> [--out_dir <dir>]
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

from dataclasses import dataclass
from pathlib import Path

import draccus

from vla_train.log import setup_logging
from vla_train.training.plots import plot_run


@dataclass
class PlotRunConfig:
    run_dir: Path = Path("runs/run")  # a training run directory
    out_dir: Path | None = None  # where the PNGs go (default <run_dir>/plots)


@draccus.wrap()
def main(cfg: PlotRunConfig) -> None:
    setup_logging()
    written = plot_run(cfg.run_dir, cfg.out_dir)
    if not written:
        raise SystemExit(f"Nothing to plot in {cfg.run_dir}: no metrics jsonl (train with --trackers '[jsonl]') and "
                         "no eval/<step>/results.json.")
    for path in written:
        print(path)  # on purpose: the files written


if __name__ == "__main__":
    main()
