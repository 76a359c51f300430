"""Configs of `vla-scripts/export_hf.py` (training run -> Hugging Face directory; LeRobot's layout for π0 runs),
`vla-scripts/import_hf.py` (OpenVLA-format Hugging Face directory -> training run directory for fine-tuning) and
`vla-scripts/import_pi0_lerobot.py` (LeRobot π0 directory -> training run directory)."""

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExportHFConfig:
    run_dir: Path  # training run directory: config.json, dataset_statistics.json, checkpoints/
    out_dir: Path | None = None  # output directory; default <run_dir>/hf or <run_dir>/hf-step-XXXXXX with --step
    step: int | None = None  # export checkpoints/step-XXXXXX-*.pt instead of latest-checkpoint.pt
    dtype: str = "fp32"  # weight dtype of the export: "fp32" or "bf16"
    max_shard_size: str = "5GB"  # safetensors shard size
    overwrite: bool = False  # write into a non-empty out_dir

    def resolved_out_dir(self) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(self.run_dir) / ("hf" if self.step is None else f"hf-step-{self.step:06d}")


@dataclass
class ImportHFConfig:
    hf_dir: Path  # OpenVLA-format Hugging Face directory (config.json with norm_stats, safetensors weights)
    out_dir: Path  # training run directory to write (checkpoints/step-000000-epoch-00-loss=inf.pt, ...)
    vla_id: str | None = None  # name recorded in config.json's vla section; default: the hf_dir's name
    overwrite: bool = False  # replace an existing imported checkpoint in out_dir
    # OpenVLA-OFT directories (with action_head--<step>_checkpoint.pt): what no weight records
    chunk_length: int | None = None  # actions per chunk (OFT LIBERO 8, ALOHA 25)
    cameras: list[str] | None = None  # camera roles in input order (LIBERO [primary, wrist])
    oft_step: str | None = None  # the step of OFT's files to read ("latest" or a number; default the highest)


@dataclass
class ImportPi0Config:
    lerobot_dir: Path  # LeRobot π0 directory: model.safetensors (and config.json, dataset_statistics.json if any)
    out_dir: Path  # training run directory to write (checkpoints/step-000000-epoch-00-loss=inf.pt, ...)
    model_id: str | None = None  # base VLM registry id; default: recorded by our export, else pi0-paligemma-224px
    vla_id: str | None = None  # name recorded in config.json's vla section; default: the lerobot_dir's name
    overwrite: bool = False  # replace an existing imported checkpoint in out_dir
