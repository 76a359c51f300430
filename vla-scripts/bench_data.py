"""Benchmark the RLDS data pipeline: frames/s, time to first frame, peak RSS and its trend, per-stage time split.

Usage: python vla-scripts/bench_data.py [--shuffle_buffer_size 10000] [--image_aug true] [--seconds 60]
Full path to a padded torch batch, frames per CPU-second: add `--full_path true` [--pixels uint8|float]
[--prefetch_batches 2] [--torch_threads 1] [--device cuda].
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import draccus

from vla_train.data.bench_cli import BenchDataCLIConfig, run
from vla_train.log import setup_logging


@draccus.wrap()
def main(cfg: BenchDataCLIConfig) -> None:
    setup_logging()
    run(cfg)


if __name__ == "__main__":
    main()
