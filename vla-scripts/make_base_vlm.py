"""Write a Prismatic base-VLM run directory (config.json + checkpoints/latest-checkpoint.pt) for a registered model.

Usage: python vla-scripts/make_base_vlm.py --model.type tiny-dinosiglip+tiny-llama [--run_dir DIR] [--llm_hf_dir DIR]
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

from pathlib import Path

import draccus

from vla_train.config.base_vlm import MakeBaseVLMConfig
from vla_train.log import setup_logging
from vla_train.models.run_dir import make_base_vlm_run_dir


@draccus.wrap()
def main(cfg: MakeBaseVLMConfig) -> None:
    setup_logging()
    run_dir = cfg.run_dir or Path("runs") / "base-vlms" / cfg.model.model_id
    make_base_vlm_run_dir(cfg.model, run_dir, llm_hf_dir=cfg.llm_hf_dir, init_seed=cfg.init_seed,
                          overwrite=cfg.overwrite)


if __name__ == "__main__":
    main()
