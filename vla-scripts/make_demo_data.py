"""Write the synthetic demo RLDS datasets (demo_bridge, demo_libero) for end-to-end training runs on CPU.

Usage: python vla-scripts/make_demo_data.py [--data_root runs/demo_data] [--num_episodes 40] [--episode_length 20]
       [--image_size 64] [--seed 0] [--val_fraction 0.1] [--overwrite true]
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

from dataclasses import dataclass
from pathlib import Path

import draccus

from vla_train.data.demo import write_demo_datasets
from vla_train.log import setup_logging


@dataclass
class MakeDemoDataConfig:
    data_root: Path = Path("runs/demo_data")  # datasets go to <data_root>/<name>/1.0.0/
    num_episodes: int = 40  # per dataset, val split included
    episode_length: int = 20  # steps per episode
    image_size: int = 64  # square images, pixels
    seed: int = 0  # the data is a deterministic function of (seed, episode index)
    val_fraction: float = 0.1  # episodes held out as the `val` split
    overwrite: bool = False  # rewrite datasets that already exist (otherwise they are kept)


@draccus.wrap()
def main(cfg: MakeDemoDataConfig) -> None:
    setup_logging()
    write_demo_datasets(cfg.data_root, num_episodes=cfg.num_episodes, episode_length=cfg.episode_length,
                        image_size=cfg.image_size, seed=cfg.seed, val_fraction=cfg.val_fraction,
                        overwrite=cfg.overwrite)


if __name__ == "__main__":
    main()
