"""Import an OpenVLA-OFT checkpoint directory (a released one, or OFT's own training output) to fine-tune from it.

Such a directory is an OpenVLA-format Hugging Face model (the LoRA-merged backbone; `export/hf_import.py` reads it)
plus OFT's per-step files (`export/oft_files.py`: `action_head--*`, `proprio_projector--*`,
`noisy_action_projector--*`, and for FiLM runs `vision_backbone--*`, LoRA-wrapped and merged here with
`lora_adapter/`'s alpha / r). The policy's sizes come from the files (head kind, action and proprio dimensions, FiLM);
the chunk length and the cameras are not in any weight, so they are options (OFT's LIBERO runs: 8 and
primary + wrist; ALOHA: 25 and primary + secondary + wrist). The result is a run directory whose config.json records
the `oft` policy and whose checkpoint holds every module, checked against the model that policy builds.
"""

from pathlib import Path

import torch

from vla_train.config.model import ModelConfig
from vla_train.config.policy import OFTPolicyConfig
from vla_train.export.oft_files import native_vision_state, read_oft_step_files
from vla_train.models.build import build_vlm
from vla_train.models.run_dir import check_state_fits

State = dict[str, torch.Tensor]


def has_oft_files(directory: Path) -> bool:
    """Whether `directory` holds OFT action-head files (`action_head--<step>_checkpoint.pt`)."""
    return any(Path(directory).glob("action_head--*_checkpoint.pt"))


def policy_from_files(states: dict[str, State], chunk_length: int | None,
                      cameras: list[str] | None, directory: Path) -> OFTPolicyConfig:
    """The `oft` policy the files describe, with the given chunk length and cameras (required)."""
    if chunk_length is None or cameras is None:
        raise ValueError(f"{directory} is an OpenVLA-OFT checkpoint: pass --chunk_length and --cameras, which no "
                         "weight records (OFT LIBERO: --chunk_length 8 --cameras '[primary, wrist]'; ALOHA: "
                         "--chunk_length 25 --cameras '[primary, secondary, wrist]').")
    head = states["action_head"]
    diffusion = any(key.startswith("noise_predictor.") for key in head)
    fc2_key = "noise_predictor.mlp_resnet.fc2.weight" if diffusion else "model.fc2.weight"
    if fc2_key not in head:
        raise ValueError(f"{directory}: the action head file lacks {fc2_key!r} (has {sorted(head)[:6]}): not an OFT "
                         "L1 or diffusion head.")
    fc2 = head[fc2_key]
    proprio = states.get("proprio_projector")
    proprio_dim = 0 if proprio is None else proprio["fc1.weight"].shape[1]
    policy = OFTPolicyConfig(head="diffusion" if diffusion else "l1", chunk_length=chunk_length,
                             action_dim=fc2.shape[0], proprio_dim=proprio_dim, cameras=list(cameras),
                             film="vision_backbone" in states)
    policy.validate()
    return policy


def oft_modules(directory: Path, model_cfg: ModelConfig, chunk_length: int | None, cameras: list[str] | None,
                step: int | str | None = None) -> tuple[OFTPolicyConfig, dict[str, State]]:
    """`(policy, {module key: state dict})` of the OFT files in `directory`, checked against the policy's model
    (built on the meta device): the heads and projectors, and with FiLM the whole FiLMed vision backbone."""
    states = read_oft_step_files(directory, step)
    if "action_head" not in states:
        raise FileNotFoundError(f"{directory} has OFT files but no action head at the step read (found "
                                f"{sorted(states)}).")
    policy = policy_from_files(states, chunk_length, cameras, directory)
    with torch.device("meta"):
        model = policy.build_model(build_vlm(model_cfg, inference_mode=True))
    modules = {}
    for piece, state in states.items():
        if piece == "vision_backbone":
            state = native_vision_state(state, model.vision_backbone, directory / f"{piece}--*")
        check_state_fits(getattr(model, piece), state, piece, directory)
        modules[piece] = {key: tensor.to(torch.float32) for key, tensor in state.items()}
    return policy, modules
