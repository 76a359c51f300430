"""Chunk-policy (OFT, VLA-Adapter) run directories built without training, for tests and export / serving checks
(the twin of `vla_train.export.compat.write_tiny_vla_run`).

`write_tiny_oft_run(model_id, run_dir, policy)` writes what an OFT (or VLA-Adapter) training run leaves behind:
- `config.json`: `{"model": <the model config section>, "vla": {"policy": {"type": "oft", ...}}}`;
- `dataset_statistics.json`: one dataset with `action` (q01/q99/mask, `[A]`) and `proprio` (q01/q99/min/max/mask,
  `[P]`) statistics;
- `checkpoints/latest-checkpoint.pt`: `{"model": {module key: state dict}}` for every module of the `OFTVLM`
  (`vision_backbone`, `projector`, `llm_backbone`, `action_head`, `proprio_projector`, `noisy_action_projector`; FiLM's
  wrapped blocks under the model's own keys; VLA-Adapter's `action_queries`), FP32, the seeded weights plus seeded
  Gaussian noise of std `noise`.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_train.atomic_io import atomic_torch_save
from vla_train.config.model import get_model_config, model_config_section
from vla_train.config.policy import OFTPolicyConfig, VLAAdapterPolicyConfig, policy_section
from vla_train.models.build import build_vlm
from vla_train.models.run_dir import CHECKPOINT_SUBDIR, LATEST_CHECKPOINT

ChunkPolicyConfig = OFTPolicyConfig | VLAAdapterPolicyConfig  # chunk policies: action_dim and proprio_dim

UNNORM_KEY = "demo_oft"


def demo_oft_norm_stats(action_dim: int, proprio_dim: int, seed: int = 0) -> dict[str, Any]:
    """`{UNNORM_KEY: {"action": ..., "proprio": ...}}` with seeded bounds (last action dimension unmasked, as a
    gripper; the last proprio dimension constant, min == max, as the pipeline zeroes such dimensions)."""
    rng = np.random.default_rng(seed)

    def bounds(dim: int) -> dict[str, list]:
        low = -rng.uniform(0.5, 2.0, dim)
        high = rng.uniform(0.5, 2.0, dim)
        return {"q01": low.tolist(), "q99": high.tolist(), "min": (low - 0.1).tolist(), "max": (high + 0.1).tolist(),
                "mask": [True] * (dim - 1) + [False] if dim > 1 else [True]}

    stats: dict[str, Any] = {"action": bounds(action_dim)}
    if proprio_dim:
        proprio = bounds(proprio_dim)
        proprio["mask"] = [True] * proprio_dim
        proprio["min"][-1] = proprio["max"][-1] = 0.25
        stats["proprio"] = proprio
    return {UNNORM_KEY: stats}


def write_tiny_oft_run(model_id: str, run_dir: str | Path, policy: ChunkPolicyConfig, *, noise: float = 0.05,
                       seed: int = 0, norm_stats: dict[str, Any] | None = None) -> Path:
    """An OFT run directory of the registered (tiny) `model_id` with `policy` (see the module docstring); returns
    `run_dir`. `noise` perturbs every weight (so the heads and FiLM matter), seeded by `seed`."""
    policy.validate()
    run_dir = Path(run_dir)
    model_cfg = get_model_config(model_id)
    norm_stats = norm_stats or demo_oft_norm_stats(policy.action_dim, policy.proprio_dim, seed)
    model = policy.build_model(build_vlm(model_cfg, vla=True, norm_stats=norm_stats))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    state = {key: {name: tensor.detach().float().clone() for name, tensor in getattr(model, key).state_dict().items()}
             for key in model.all_module_keys}
    atomic_torch_save({"model": state}, run_dir / CHECKPOINT_SUBDIR / LATEST_CHECKPOINT)
    config = {"model": model_config_section(model_cfg), "vla": {"policy": policy_section(policy)}}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2))
    return run_dir
