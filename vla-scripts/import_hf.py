"""Import an OpenVLA-format Hugging Face directory (e.g. openvla-7b) as a training run directory for fine-tuning.

Usage: python vla-scripts/import_hf.py --hf_dir <hf_dir> --out_dir runs/<name>
then:  python vla-scripts/train.py ... --pretrained_checkpoint runs/<name>/checkpoints/<...>.pt --is_resume false
An OpenVLA-OFT checkpoint directory (with action_head--<step>_checkpoint.pt) imports as an `oft` policy run:
add --chunk_length 8 --cameras '[primary, wrist]' (what no weight records; OFT's LIBERO values). A VLA-Adapter
checkpoint directory (merged model with action_queries.weight, plus action_head--<step>_checkpoint.pt) imports as a
`vla-adapter` policy run with the same two options (its LIBERO / CALVIN values are the same).
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import draccus

from vla_train.config.export import ImportHFConfig
from vla_train.export.hf_import import import_hf
from vla_train.log import setup_logging


@draccus.wrap()
def main(cfg: ImportHFConfig) -> None:
    setup_logging()
    import_hf(cfg.hf_dir, cfg.out_dir, vla_id=cfg.vla_id, overwrite=cfg.overwrite, chunk_length=cfg.chunk_length,
              cameras=cfg.cameras, oft_step=cfg.oft_step)


if __name__ == "__main__":
    main()
