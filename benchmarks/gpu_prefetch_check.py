"""GPU check of the data path to the device (needs CUDA; run from the repository root:
`python benchmarks/gpu_prefetch_check.py cuda`). Asserts that `normalize_on_device` on the GPU is bit-equal to the
host float transform for every resize strategy and a fused backbone, and that prefetched batches (pinned memory,
copied on a side stream) reach the model inputs equal to a synchronous CPU pass, with the consumed position as state.
It runs on CPU too (`... cpu`), which the test suite covers; the CUDA-only parts are the point of this script."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the tests' stub dataset

import numpy as np
import torch
from PIL import Image

from tests.data.test_prefetch import _Counter, _item
from vla_train.config.policy import OpenVLAPolicyConfig
from vla_train.data.collator import PaddedCollatorForActionPrediction
from vla_train.data.prefetch import BatchPrefetcher
from vla_train.models.vision import VisionBackbone
from vla_train.training.trainer import device_inputs

POLICY = OpenVLAPolicyConfig().build()  # the `openvla` policy's inputs

SIZES = [(224, 224), (256, 320), (97, 61)]


def check_normalization(device: torch.device) -> None:
    """uint8 -> device normalization equals the host float transform, bit for bit."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    for backbone_id in ("tiny-dinosiglip-vit", "tiny-siglip-vit"):
        for strategy in ("resize-naive", "resize-crop", "letterbox"):
            transform = VisionBackbone(backbone_id, strategy).get_image_transform()
            pixels = [transform.to_uint8(image) for image in images]
            if transform.is_fused:
                batched = {k: torch.stack([p[k] for p in pixels]).to(device) for k in transform.keys}
            else:
                batched = torch.stack(pixels).to(device)
            got = transform.normalize_on_device(batched)
            for n, image in enumerate(images):
                expected = transform(image)
                pairs = [(expected[k], got[k][n]) for k in transform.keys] if transform.is_fused \
                    else [(expected, got[n])]
                assert all(torch.equal(e.to(device), g) for e, g in pairs), (backbone_id, strategy)
    print("normalize_on_device is bit-equal to the host transform on", device)


def check_prefetch(device: torch.device) -> None:
    """Prefetched (pinned, side-stream) batches equal synchronous ones; the state is the consumed position."""
    collate = PaddedCollatorForActionPrediction(8, 0)
    sync = BatchPrefetcher(_Counter(), _item, collate, 16, depth=0, normalize=lambda p: p.float() / 3)
    ahead = BatchPrefetcher(_Counter(), _item, collate, 16, depth=3, device=device, normalize=lambda p: p.float() / 3)
    for _ in range(50):
        expected, batch = device_inputs(POLICY, next(sync), torch.device("cpu")), next(ahead)
        assert batch["input_ids"].is_pinned() == (device.type == "cuda")
        got = device_inputs(POLICY, batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert all(torch.equal(expected[k], got[k].cpu()) for k in ("input_ids", "attention_mask", "labels",
                                                                     "pixel_values"))
    assert ahead.state_dict() == sync.state_dict() == {"frames_yielded": 800}
    ahead.close()
    print("prefetched batches equal the synchronous ones; state", ahead.state_dict())


if __name__ == "__main__":
    target = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    check_normalization(target)
    check_prefetch(target)
