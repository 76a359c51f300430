"""Check that exports load and predict exactly with the transformers of another Python interpreter.

Usage: python vla-scripts/check_export_compat.py --python /tmp/venv-tf440/bin/python [--work_dir DIR]
The interpreter needs transformers, tokenizers, torch, timm and pillow (not vla_train); see vla_train/export/compat.py.
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import draccus

from vla_train.export.compat import ExportCompatConfig, check_export_compat
from vla_train.log import setup_logging


@draccus.wrap()
def main(cfg: ExportCompatConfig) -> None:
    setup_logging()
    check_export_compat(cfg.python, cfg.model_ids, work_dir=cfg.work_dir, timeout_s=cfg.timeout_s)


if __name__ == "__main__":
    main()
