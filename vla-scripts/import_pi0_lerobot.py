"""Import LeRobot π0 weights (e.g. a local copy of lerobot/pi0_base) as a training run directory for fine-tuning.

Usage: python vla-scripts/import_pi0_lerobot.py --lerobot_dir <dir with model.safetensors> --out_dir runs/<name>
then:  torchrun --nproc-per-node 8 vla-scripts/train.py --vla.type pi0-libero \\
           --pretrained_checkpoint runs/<name>/checkpoints/latest-checkpoint.pt --is_resume false
The policy options (chunk length, instruction tokens, Euler steps) come from the directory's config.json.
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import draccus

from vla_train.config.export import ImportPi0Config
from vla_train.export.pi0_run import import_pi0_lerobot
from vla_train.log import setup_logging


@draccus.wrap()
def main(cfg: ImportPi0Config) -> None:
    setup_logging()
    import_pi0_lerobot(cfg.lerobot_dir, cfg.out_dir, model_id=cfg.model_id, vla_id=cfg.vla_id,
                       overwrite=cfg.overwrite)


if __name__ == "__main__":
    main()
