"""π0 runs to and from LeRobot's π0 directories (`model.safetensors` in LeRobot's keys, `export/pi0_lerobot.py`).

- `export_pi0_run(run_dir, out_dir, checkpoint)`: the run's consolidated checkpoint -> `out_dir/model.safetensors`,
  `out_dir/config.json` (LeRobot's `PI0Config` fields: `type` "pi0", `chunk_size`, `n_action_steps`,
  `max_state_dim` / `max_action_dim` 32, `tokenizer_max_length`, `num_steps`; plus a `vla_train` section with the
  model id and the policy options an import rebuilds from) and the run's `dataset_statistics.json`. The weights are
  LeRobot's; its feature and normalization processor files are not written (LeRobot's own training writes them from
  its dataset), so a LeRobot user loads the weights into their `PI0Policy` with their dataset's processors.
- `import_pi0_lerobot(lerobot_dir, out_dir, ...)`: LeRobot π0 weights (e.g. `lerobot/pi0_base` on disk) -> a
  training run directory (`config.json` with the model and the `pi0` policy, `checkpoints/step-000000-epoch-00-
  loss=inf.pt` + `latest-checkpoint.pt` in the native `{"model": {module key: state}}` form): fine-tune from it
  with `--pretrained_checkpoint <checkpoint> --is_resume false`. Every check runs before the first write; the model is
  built on the meta device (keys and shapes only), so host memory holds one copy of the weights.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import draccus
import torch

from vla_train.atomic_io import atomic_torch_save, atomic_write_json
from vla_train.config.model import get_model_config, model_config_section
from vla_train.config.policy import Pi0PolicyConfig, policy_section, read_policy_config
from vla_train.export.pi0_lerobot import LEROBOT_FILE, read_lerobot, save_lerobot
from vla_train.log import logger
from vla_train.models.build import build_vlm
from vla_train.models.pi0.model import PADDED_DIM
from vla_train.models.run_dir import CHECKPOINT_SUBDIR, LATEST_CHECKPOINT, check_state_fits, load_run_dir
from vla_train.training.checkpoint_io import atomic_link_or_copy, checkpoint_name

DATASET_STATISTICS = "dataset_statistics.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def lerobot_config(model_id: str, policy: Pi0PolicyConfig) -> dict[str, Any]:
    """LeRobot's `PI0Config` fields for `policy`, and a `vla_train` section to rebuild the model from."""
    return {"type": "pi0", "chunk_size": policy.chunk_length, "n_action_steps": policy.chunk_length,
            "max_state_dim": PADDED_DIM, "max_action_dim": PADDED_DIM, "tokenizer_max_length": policy.max_token_len,
            "num_steps": policy.num_inference_steps,
            "vla_train": {"model_id": model_id, "policy": policy_section(policy)}}


def export_pi0_run(run_dir: str | Path, out_dir: str | Path, checkpoint: Path, dtype: str = "fp32") -> Path:
    """Write the π0 run's `checkpoint` (a consolidated `.pt`) to `out_dir` in LeRobot's layout; returns out_dir."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}. Fix: pass --dtype one of {sorted(DTYPES)}.")
    policy = read_policy_config(run_dir)
    if not isinstance(policy, Pi0PolicyConfig):
        raise ValueError(f"{run_dir} trains the {policy.family!r} policy, not π0.")
    model = load_run_dir(run_dir, checkpoint=checkpoint)
    state = {key: tensor.to(DTYPES[dtype]) for key, tensor in model.state_dict().items()}
    save_lerobot(model, out_dir, state)
    atomic_write_json(out_dir / "config.json", lerobot_config(model.model_id, policy))
    if (run_dir / DATASET_STATISTICS).is_file():
        shutil.copyfile(run_dir / DATASET_STATISTICS, out_dir / DATASET_STATISTICS)
    logger.info("Exported %s (π0, %s) to %s in LeRobot's layout as %s", checkpoint, model.model_id, out_dir, dtype)
    return out_dir


def _import_policy(config: dict[str, Any], policy: Pi0PolicyConfig | None) -> tuple[str | None, Pi0PolicyConfig]:
    """The model id and policy an import builds: `policy` if given, else the ones our export recorded, else the
    defaults with LeRobot's `chunk_size` / `tokenizer_max_length` / `num_steps`."""
    recorded = config.get("vla_train", {})
    if policy is None and recorded.get("policy"):
        policy = draccus.decode(Pi0PolicyConfig, {k: v for k, v in recorded["policy"].items() if k != "type"})
    if policy is None:
        policy = Pi0PolicyConfig(chunk_length=config.get("chunk_size", 50),
                                 max_token_len=config.get("tokenizer_max_length", 48),
                                 num_inference_steps=config.get("num_steps", 10))
    policy.validate()
    return recorded.get("model_id"), policy


def import_pi0_lerobot(lerobot_dir: str | Path, out_dir: str | Path, *, model_id: str | None = None,
                       policy: Pi0PolicyConfig | None = None, vla_id: str | None = None,
                       overwrite: bool = False) -> Path:
    """Write a training run directory for LeRobot π0 weights (module docstring); returns its checkpoint path.
    `model_id` (default: the one our export recorded, else `pi0-paligemma-224px`) and `policy` (default: recorded,
    else from LeRobot's config.json) must describe the weights' sizes (checked by key and shape)."""
    lerobot_dir, out_dir = Path(lerobot_dir), Path(out_dir)
    checkpoint = out_dir / CHECKPOINT_SUBDIR / f"{checkpoint_name(0, 0, None)}.pt"
    if checkpoint.exists() and not overwrite:
        raise FileExistsError(f"{checkpoint} exists. Fix: pass --overwrite true or another --out_dir.")
    if not (lerobot_dir / LEROBOT_FILE).is_file():
        raise FileNotFoundError(f"{lerobot_dir / LEROBOT_FILE} does not exist: pass a LeRobot π0 directory.")
    config_path = lerobot_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    recorded_id, policy = _import_policy(config, policy)
    model_cfg = get_model_config(model_id or recorded_id or "pi0-paligemma-224px")
    statistics_path = lerobot_dir / DATASET_STATISTICS
    norm_stats = json.loads(statistics_path.read_text()) if statistics_path.is_file() else None
    with torch.device("meta"):  # keys and shapes only: the weights come from the file, never initialized here
        model = policy.build_model(build_vlm(model_cfg))
    state = read_lerobot(lerobot_dir)
    check_state_fits(model, state, "π0", lerobot_dir)
    modules: dict[str, dict[str, torch.Tensor]] = {key: {} for key in model.all_module_keys}
    for full_key, tensor in state.items():
        key, _, name = full_key.partition(".")
        modules[key][name] = tensor.float()
    atomic_torch_save({"model": modules}, checkpoint)
    atomic_link_or_copy(checkpoint, checkpoint.parent / LATEST_CHECKPOINT)
    vla_id = vla_id or lerobot_dir.resolve().name
    atomic_write_json(out_dir / "config.json", {
        "model": model_config_section(model_cfg),
        "vla": {"type": vla_id, "vla_id": vla_id, "base_vlm": model_cfg.model_id, "policy": policy_section(policy)},
        "imported_from": {"lerobot_dir": str(lerobot_dir.resolve())}})
    if norm_stats is not None:
        atomic_write_json(out_dir / DATASET_STATISTICS, norm_stats)
    logger.info("Imported %s as %s (%s, π0 policy); fine-tune with --pretrained_checkpoint %s --is_resume false",
                lerobot_dir, out_dir, model_cfg.model_id, checkpoint)
    return checkpoint
