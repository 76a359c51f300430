"""Shared fixtures. `vla_train` is imported first: it fixes the torch/torchvision/timm-before-tensorflow order."""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

import vla_train  # noqa: F401  (must precede any tensorflow import)

# isort: split

import numpy as np
import pytest
import torch
from PIL import Image

from vla_train.config.model import get_model_config
from vla_train.log import LOGGER_NAME, logger
from vla_train.models.build import build_vlm

TINY_MODEL_IDS = ("tiny-siglip+tiny-llama", "tiny-dinosiglip+tiny-llama", "tiny-dinosiglip+tiny-qwen25")
NORM_STATS = {
    "demo_dataset": {
        "action": {
            "q01": [-0.5, -0.4, -0.3, -1.0, -2.0, -3.0, 0.0],
            "q99": [0.5, 0.6, 0.7, 1.0, 2.0, 3.0, 1.0],
            "mask": [True, True, True, True, True, True, False],
        }
    }
}


@pytest.fixture
def log_records(caplog):
    """`caplog` for the project logger (which stops propagating to the root logger once set up), from INFO up."""
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def process_group():
    """A single-process default group (gloo on CPU) from the production `init_distributed`, destroyed after."""
    from vla_train.training.distributed import destroy_distributed, init_distributed

    assert not torch.distributed.is_initialized(), "a test left a default process group behind"
    init_distributed(timeout_minutes=2)
    yield
    destroy_distributed()


@pytest.fixture
def rgb_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8))


def build_tiny(model_id: str, vla: bool = False, **kwargs):
    return build_vlm(get_model_config(model_id), vla=vla, norm_stats=NORM_STATS if vla else None, **kwargs)


def batch_pixels(vlm, image: Image.Image):
    """The model's image transform applied to one image, with a batch dimension."""
    pixels = vlm.vision_backbone.get_image_transform()(image)
    if isinstance(pixels, dict):
        return {k: v[None] for k, v in pixels.items()}
    return pixels[None]


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
