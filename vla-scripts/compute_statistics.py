"""Compute (or find cached) the action/proprio statistics of a mixture's datasets before training, in parallel over
datasets and record files, into the cache files training reads (see vla_train/data/compute_statistics.py).

Usage: python vla-scripts/compute_statistics.py --data_root_dir <root> --data_mix <mixture or dataset>
           [--statistics_cache_dir <shared dir>] [--num_workers 16] [--overwrite true]
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import draccus

from vla_train.data.compute_statistics import ComputeStatisticsConfig, run
from vla_train.log import setup_logging


@draccus.wrap()
def main(cfg: ComputeStatisticsConfig) -> None:
    setup_logging()
    for name, path in sorted(run(cfg).items()):
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
