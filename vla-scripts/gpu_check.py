"""One-GPU throughput check (samples/s, MFU, peak memory, data wait) of the MiniVLA-size and OpenVLA-7B models.

Usage: python vla-scripts/gpu_check.py [--models minivla 7b] [--steps 200] [--batch_size B] [--json results.json]
See `vla_train/training/gpu_check.py` for what it runs and substitutes (random weights, no downloads, no checkpoints).
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import sys

from vla_train.training.gpu_check import cli

if __name__ == "__main__":
    sys.exit(cli())
