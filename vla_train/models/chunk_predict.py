"""`predict_action` for chunk policies (OFT, VLA-Adapter): camera images, an instruction and raw proprio -> the
un-normalized chunk `[H, A]`.

Inputs are processed as in training: each camera's image through the model's image transform (the cameras in the
order the policy was trained with), the OpenVLA prompt prefix, proprio normalized with the dataset's statistics
(`bounds_q99`, the pipeline's normalization); the normalized chunk is un-normalized with the action statistics.
"""

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from vla_train.data.normalization import normalize_np
from vla_train.models.openvla import dataset_statistics, unnormalize_actions
from vla_train.models.vla_prompt import vla_prompt_prefix_ids

if TYPE_CHECKING:
    from vla_train.models.chunk_vlm import ChunkVLM


def camera_pixels(model: "ChunkVLM", images: list[Image.Image], device: torch.device) -> list[Any]:
    """One PIL image per camera -> per camera `[1, 3, S, S]` (or a dict per featurizer) on `device`."""
    transform = model.vision_backbone.get_image_transform()
    cameras = []
    for image in images:
        pixels = transform(image)
        cameras.append({k: v[None].to(device) for k, v in pixels.items()} if isinstance(pixels, dict)
                       else pixels[None].to(device))
    return cameras


def predict_action(model: "ChunkVLM", images: Image.Image | list[Image.Image], instruction: str,
                   proprio: np.ndarray | None = None, unnorm_key: str | None = None,
                   num_inference_steps: int | None = None, seed: int = 0) -> np.ndarray:
    """Un-normalized actions `[H, A]` (float64) for dataset `unnorm_key`. `images`: one per camera; `proprio`: raw
    `[P]` (required when the model has a proprio projector); `seed` drives the diffusion head's noise."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    stats = dataset_statistics(getattr(model, "norm_stats", {}), unnorm_key)
    device = next(model.parameters()).device
    proprio_tensor = None
    if model.proprio_projector is not None:
        if proprio is None:
            raise ValueError(f"This policy reads proprio [{model.proprio_dim}]: pass proprio= (raw robot state).")
        normalized = normalize_np(np.asarray(proprio, np.float32).reshape(-1), stats["proprio"])
        if normalized.shape[0] != model.proprio_dim:
            raise ValueError(f"proprio has {normalized.shape[0]} values, the policy reads {model.proprio_dim}.")
        proprio_tensor = torch.from_numpy(normalized)[None].to(device)
    tokenizer = model.llm_backbone.get_tokenizer()
    prefix = vla_prompt_prefix_ids(model.llm_backbone.prompt_builder_fn, tokenizer, instruction)
    input_ids = torch.tensor([prefix], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        chunk = model.predict_action_chunk(input_ids, torch.ones_like(input_ids, dtype=torch.bool),
                                           camera_pixels(model, images, device), proprio_tensor, generator=generator,
                                           num_inference_steps=num_inference_steps)
    return unnormalize_actions(chunk[0].float().cpu().numpy(), stats["action"])
