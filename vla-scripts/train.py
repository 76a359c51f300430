"""Train a VLA: `torchrun --nproc-per-node 8 vla-scripts/train.py --vla.type <vla_id> [--data_root_dir ...]`.

Also runs without torchrun (one process). See README "Training" for resume, fine-tuning and the demo.
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import draccus

from vla_train.config.train import TrainConfig
from vla_train.training.entry import train


@draccus.wrap()
def main(cfg: TrainConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
