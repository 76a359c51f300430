"""Serve a VLA over HTTP: `POST /act` (the reference's json-numpy payload) and `GET /health`.

Usage: python vla-scripts/deploy.py --run_dir runs/<run_id> [--step N] [--host 127.0.0.1] [--port 8000]
       python vla-scripts/deploy.py --hf_dir <exported Hugging Face directory>
See README "Serving", `vla_train/config/deploy.py` and `--help` for every option.
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import draccus

from vla_train.config.deploy import DeployConfig
from vla_train.export.server import serve
from vla_train.log import setup_logging


@draccus.wrap()
def main(cfg: DeployConfig) -> None:
    setup_logging()
    serve(cfg)


if __name__ == "__main__":
    main()
