"""`predict_action` for π0: camera images, an instruction and raw proprio -> the un-normalized chunk `[H, A]`.

Inputs are processed as in training (`policies/pi0_processor.py`): each camera's image through the model's image
transform (cameras in the trained order; fewer images than cameras mask the missing ones out, as openpi's image
masks do), the π0 prompt, proprio normalized with the dataset's statistics (MEAN_STD, as the pipeline recorded); the
sampled chunk is un-normalized with the action statistics.
"""

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from vla_train.data.normalization import normalize_np
from vla_train.models.chunk_predict import camera_pixels
from vla_train.models.openvla import dataset_statistics, unnormalize_actions
from vla_train.models.pi0.prompt import pi0_prompt_ids

if TYPE_CHECKING:
    from vla_train.models.pi0.model import Pi0VLM


def _pixels(model: "Pi0VLM", images: list[Image.Image], num_cameras: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[1, C, 3, S, S]` pixels and the `[1, C]` image mask (cameras past the given images: zeros, masked out)."""
    if not 1 <= len(images) <= num_cameras:
        raise ValueError(f"This π0 policy reads {num_cameras} camera image(s); got {len(images)}.")
    cameras = camera_pixels(model, images, device)
    cameras += [torch.zeros_like(cameras[0])] * (num_cameras - len(images))
    mask = torch.tensor([[index < len(images) for index in range(num_cameras)]], device=device)
    return torch.stack(cameras, dim=1), mask


def predict_action(model: "Pi0VLM", images: Image.Image | list[Image.Image], instruction: str,
                   proprio: np.ndarray | None = None, unnorm_key: str | None = None,
                   num_inference_steps: int | None = None, seed: int = 0) -> np.ndarray:
    """Un-normalized actions `[H, A]` (float64) for dataset `unnorm_key`; `seed` drives the initial noise."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    stats = dataset_statistics(getattr(model, "norm_stats", {}), unnorm_key)
    device = next(model.parameters()).device
    pixels, image_mask = _pixels(model, images, model.num_cameras, device)
    state = None
    if model.proprio_dim:
        if proprio is None:
            raise ValueError(f"This policy reads a state of {model.proprio_dim} values: pass proprio= (raw robot "
                             "state).")
        normalized = normalize_np(np.asarray(proprio, np.float32).reshape(-1), stats["proprio"])
        if normalized.shape[0] != model.proprio_dim:
            raise ValueError(f"proprio has {normalized.shape[0]} values, the policy reads {model.proprio_dim}.")
        state = torch.from_numpy(normalized)[None].to(device)
    ids = pi0_prompt_ids(model.llm_backbone.get_tokenizer(), instruction, model.max_token_len)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        chunk = model.sample_actions(pixels, image_mask, input_ids, torch.ones_like(input_ids, dtype=torch.bool),
                                     state, generator, num_inference_steps)
    return unnormalize_actions(chunk[0].float().cpu().numpy(), stats["action"])
