"""Benchmark the RLDS data pipeline: frames/s, time to first frame, peak RSS and its trend, per-stage time split.

Usage: python vla-scripts/bench_data.py [--shuffle_buffer_size 10000] [--image_aug true] [--seconds 60]
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import draccus

from vla_train.config.bench import BenchDataConfig
from vla_train.data.bench_cli import run
from vla_train.log import setup_logging


@draccus.wrap()
def main(cfg: BenchDataConfig) -> None:
    setup_logging()
    run(cfg)


if __name__ == "__main__":
    main()
