"""Export a training run's checkpoint as a Hugging Face directory (OpenVLA layout, remote code, safetensors).

Usage: python vla-scripts/export_hf.py --run_dir runs/<run_id> [--step N] [--out_dir DIR] [--dtype bf16]
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import draccus

from vla_train.config.export import ExportHFConfig
from vla_train.export.hf import export_hf
from vla_train.log import setup_logging


@draccus.wrap()
def main(cfg: ExportHFConfig) -> None:
    setup_logging()
    export_hf(cfg.run_dir, cfg.resolved_out_dir(), step=cfg.step, dtype=cfg.dtype, overwrite=cfg.overwrite,
              max_shard_size=cfg.max_shard_size)


if __name__ == "__main__":
    main()
