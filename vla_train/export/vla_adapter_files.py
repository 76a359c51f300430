"""VLA-Adapter's checkpoint files: write them from a run, read a release (or its training output) to fine-tune from it.

VLA-Adapter (OFT's file conventions, facts: policies_facts.md) saves in each checkpoint directory
`action_head--<step>_checkpoint.pt` (`L1RegressionActionHead`: `model.{layer_norm1, fc1, mlp_resnet_blocks.{i}.*,
layer_norm2, fc2}.*`), `proprio_projector--<step>_checkpoint.pt` (`fc1`, `fc2`), `lora_adapter/` (peft, the VLM's
adapters), `dataset_statistics.json` and, merged, an OpenVLA-format Hugging Face model whose weights also hold
`action_queries.weight [N, D]` (`export_hf` writes that directory for a `vla-adapter` run, with these files beside it).
Upstream's Pro blocks carry an unused FiLM Linear (`film_gen.0.*`, "kept to avoid conflict with checkpoints"): we do
not hold it (about 1.6 M parameters per block), write it as zeros so upstream's strict `load_state_dict` accepts our
files, and drop it on read. Reading strips DDP's `module.` prefix (`export/oft_files.py`).
"""

from pathlib import Path
from typing import Any

import torch

from vla_train.config.lora import LoRAConfig
from vla_train.config.model import ModelConfig
from vla_train.config.policy import VLAAdapterPolicyConfig
from vla_train.export.oft_checkpoint import module_state, write_lora_adapter
from vla_train.export.oft_files import read_oft_step_files, write_oft_step_files
from vla_train.models.build import build_vlm
from vla_train.models.run_dir import check_state_fits
from vla_train.models.vla_adapter.bridge import UNUSED_UPSTREAM_KEYS

State = dict[str, torch.Tensor]
PIECES = ("action_head", "proprio_projector")
ACTION_QUERIES_KEY = "action_queries.weight"  # the merged HF model's key (and ours)
_BLOCKS = "model.mlp_resnet_blocks."


def _block_indices(head: State) -> list[int]:
    return sorted({int(key[len(_BLOCKS):].split(".")[0]) for key in head if key.startswith(_BLOCKS)})


def to_upstream_head(head: State, pro: bool) -> State:
    """Our action head state -> upstream's file layout: Pro blocks gain zero `film_gen.0.{weight [2D, D], bias}`."""
    state = dict(head)
    if not pro:
        return state
    for index in _block_indices(head):
        width = head[f"{_BLOCKS}{index}.q_proj.weight"].shape[0]
        state[f"{_BLOCKS}{index}.film_gen.0.weight"] = torch.zeros(2 * width, width)
        state[f"{_BLOCKS}{index}.film_gen.0.bias"] = torch.zeros(2 * width)
    return state


def from_upstream_head(head: State) -> State:
    """Upstream's action head file -> our keys (the unused `film_gen` dropped)."""
    return {key: tensor for key, tensor in head.items() if not key.endswith(UNUSED_UPSTREAM_KEYS)}


def write_vla_adapter_files(modules: dict[str, State], directory: Path, step: int | str, pro: bool,
                            dataset_statistics: dict[str, Any] | None = None) -> list[Path]:
    """`action_head--<step>_checkpoint.pt` and `proprio_projector--...` (for the pieces `modules` has, our keys) in
    upstream's layout, FP32 on the CPU, and the statistics when given, into `directory`."""
    states = {piece: {key: tensor.detach().to(device="cpu", dtype=torch.float32) for key, tensor in
                      modules[piece].items()} for piece in PIECES if modules.get(piece)}
    if "action_head" in states:
        states["action_head"] = to_upstream_head(states["action_head"], pro)
    return write_oft_step_files(states, directory, step, dataset_statistics)


def write_vla_adapter_checkpoint(full_state: State, directory: Path, step: int | str, *, pro: bool,
                                 featurizer_keys: tuple[str, ...], lora: LoRAConfig | None,
                                 dataset_statistics: dict[str, Any] | None) -> list[Path]:
    """Every VLA-Adapter file of one checkpoint into `directory` (rank 0, the gathered unmerged state)."""
    modules = {piece: module_state(full_state, piece) for piece in PIECES}
    paths = write_vla_adapter_files(modules, directory, step, pro, dataset_statistics)
    if lora is not None:
        paths.append(write_lora_adapter(full_state, featurizer_keys, lora, directory))
    return paths


def policy_from_files(states: dict[str, State], action_queries: torch.Tensor, chunk_length: int | None,
                      cameras: list[str] | None, directory: Path) -> VLAAdapterPolicyConfig:
    """The `vla-adapter` policy the files describe, with the given chunk length and cameras (required)."""
    if chunk_length is None or cameras is None:
        raise ValueError(f"{directory} is a VLA-Adapter checkpoint: pass --chunk_length and --cameras, which no "
                         "weight records (VLA-Adapter LIBERO / CALVIN: --chunk_length 8 --cameras '[primary, wrist]').")
    head = states.get("action_head")
    if head is None or "model.fc2.weight" not in head or not _block_indices(head):
        raise ValueError(f"{directory}: no VLA-Adapter action head file (action_head--<step>_checkpoint.pt with "
                         "model.mlp_resnet_blocks.<i>.q_proj.*) beside the ActionQuery weights.")
    proprio = states.get("proprio_projector")
    if proprio is not None and "fc1.weight" not in proprio:
        raise ValueError(f"{directory}: the proprio_projector file lacks fc1.weight (has {sorted(proprio)[:6]}): not "
                         "a VLA-Adapter ProprioProjector.")
    policy = VLAAdapterPolicyConfig(
        chunk_length=chunk_length, action_dim=head["model.fc2.weight"].shape[0],
        proprio_dim=0 if proprio is None else proprio["fc1.weight"].shape[1], cameras=list(cameras),
        num_action_queries=action_queries.shape[0], block="pro" if f"{_BLOCKS}0.k_self.weight" in head else "original")
    policy.validate()
    return policy


def vla_adapter_modules(directory: Path, model_cfg: ModelConfig, action_queries: torch.Tensor,
                        chunk_length: int | None, cameras: list[str] | None, step: int | str | None = None
                        ) -> tuple[VLAAdapterPolicyConfig, dict[str, State]]:
    """`(policy, {module key: state dict})` of a VLA-Adapter directory's files and ActionQueries, checked against the
    policy's model (built on the meta device)."""
    states = read_oft_step_files(directory, step)
    policy = policy_from_files(states, action_queries, chunk_length, cameras, directory)
    with torch.device("meta"):
        model = policy.build_model(build_vlm(model_cfg, inference_mode=True))
    states["action_head"] = from_upstream_head(states["action_head"])
    states["action_queries"] = {"weight": action_queries}
    modules = {}
    for piece, state in states.items():
        if piece not in model.present_new_module_keys:
            raise ValueError(f"{directory}: {piece} files do not fit the policy the weights describe ({policy}).")
        check_state_fits(getattr(model, piece), state, piece, directory)
        modules[piece] = {key: tensor.to(torch.float32) for key, tensor in state.items()}
    return policy, modules


def step_of(checkpoint: Path) -> int | str:
    """The training step in a checkpoint file's name (`step-000006-epoch-...pt`), else `latest`."""
    from vla_train.training.checkpoint_io import parse_checkpoint_name  # lazy: the training package is heavier

    parsed = parse_checkpoint_name(Path(checkpoint).resolve().name.removesuffix(".pt"))
    return parsed[0] if parsed else "latest"


def add_action_queries(model: torch.nn.Module, policy: VLAAdapterPolicyConfig, vlm: torch.nn.Module,
                       modules: dict[str, State], checkpoint: Path, dtype: torch.dtype) -> State:
    """Check the checkpoint's VLA-Adapter modules against the policy's model (built on the meta device around the
    exported `vlm`), give the meta-device HF `model` the `action_queries` Embedding (as VLA-Adapter's modeling code
    has; our remote code ignores it), and return the exported tensors `{"action_queries.weight": [N, D]}`."""
    with torch.device("meta"):
        adapter = policy.build_model(vlm)
    missing = [key for key in adapter.present_new_module_keys if key not in modules]
    if missing:
        raise ValueError(f"{checkpoint} lacks {['model.' + key for key in missing]} (has {sorted(modules)}): a "
                         "VLA-Adapter export needs the trained ActionQueries, policy and projector, as training saves "
                         "them.")
    for key in adapter.present_new_module_keys:
        check_state_fits(getattr(adapter, key), modules[key], key, checkpoint)
    weight = modules["action_queries"]["weight"]
    with torch.device("meta"):
        model.action_queries = torch.nn.Embedding(*weight.shape)
    return {ACTION_QUERIES_KEY: weight.to(dtype)}
