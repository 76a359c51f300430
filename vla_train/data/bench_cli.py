"""`bench_data.py`'s body: prepare the workload, build the torch path, run, print the table rows."""

import platform
from dataclasses import dataclass, replace
from datetime import date

import psutil
import torch

from vla_train.config.bench import BenchDataConfig
from vla_train.config.model import get_model_config
from vla_train.data.bench import BENCH_MIXTURE, run_benchmark, run_full_path, write_benchmark_datasets
from vla_train.data.collator import PaddedCollatorForActionPrediction
from vla_train.data.interleave import PipelineConfig
from vla_train.data.torch_dataset import RLDSBatchTransform
from vla_train.log import logger
from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.llm import get_llm_backbone_spec
from vla_train.models.prompts import get_prompt_builder_class
from vla_train.models.tokenizers import build_tiny_tokenizer
from vla_train.models.vision import VisionBackbone


@dataclass
class BenchDataCLIConfig(BenchDataConfig):
    """`BenchDataConfig` plus the full-path mode (`--full_path true`)."""

    full_path: bool = False  # time the whole path to a padded (pinned on CUDA) batch, in frames per CPU-second
    pixels: str = "uint8"  # "uint8": the training path (normalized on the device); "float": normalized on the host
    prefetch_batches: int = 2  # batches prepared ahead by the prefetch thread (0: on the consuming thread)
    torch_threads: int | None = None  # torch intra-op threads (None: torch's default)
    device: str = "cpu"  # "cuda": collate into pinned host memory, as training on a GPU does


def _torch_path(cfg: BenchDataConfig):
    """Batch transform + collator of `cfg.model_id` (vision transform built on meta: no weights needed).

    Without the LLM's tokenizer on disk the project's tiny tokenizer stands in (same work per token, more tokens).
    """
    model_cfg = get_model_config(cfg.model_id)
    with torch.device("meta"):
        vision = VisionBackbone(model_cfg.vision_backbone_id, model_cfg.image_resize_strategy)
    spec = get_llm_backbone_spec(model_cfg.llm_backbone_id)
    tokenizer = build_tiny_tokenizer("llama" if spec.tokenizer_adds_bos else "qwen")
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    transform = RLDSBatchTransform(ActionTokenizer(tokenizer), tokenizer, vision.get_image_transform(),
                                   get_prompt_builder_class(spec.prompt_builder))
    return transform, PaddedCollatorForActionPrediction(2048, tokenizer.pad_token_id)


def _pipeline(cfg: BenchDataConfig) -> PipelineConfig:
    extra_dirs = ()
    if cfg.data_mix == BENCH_MIXTURE:
        extra_dirs = (write_benchmark_datasets(cfg.data_root_dir),)
    return PipelineConfig(data_root_dir=cfg.data_root_dir, data_mix=cfg.data_mix,
                          resize_resolution=(cfg.resolution, cfg.resolution),
                          shuffle_buffer_size=cfg.shuffle_buffer_size, image_aug=cfg.image_aug,
                          deterministic=cfg.deterministic, registry_dirs=extra_dirs)


def run_full(cfg: BenchDataCLIConfig) -> None:
    """One full-path row: frames per CPU-second (the stable figure on a shared machine), frames/s, cores used."""
    if cfg.pixels not in ("uint8", "float"):
        raise ValueError(f"pixels = {cfg.pixels!r}: choose 'uint8' (the training path) or 'float' (host-normalized).")
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    transform, collator = _torch_path(cfg) if cfg.torch_path else (None, None)
    if transform is not None:
        transform = replace(transform, uint8_pixels=cfg.pixels == "uint8")
    result = run_full_path(_pipeline(cfg), transform, collator, batch_size=cfg.batch_size,
                           depth=cfg.prefetch_batches, device=cfg.device, seconds=cfg.seconds)
    logger.info("full-path benchmark %s: mixture %s, buffer %d, aug %s, model %s, batch %d, %d frames", date.today(),
                cfg.data_mix, cfg.shuffle_buffer_size, cfg.image_aug, cfg.model_id, cfg.batch_size, result.frames)
    path = f"{cfg.pixels} | {cfg.prefetch_batches}" if cfg.torch_path else "tf.data only | -"
    print(f"| {path} | {torch.get_num_threads()} | "
          f"{result.frames_per_cpu_second:.0f} | {result.frames_per_second:.0f} | {result.cpu_cores_used:.2f} | "
          f"{result.time_to_first_batch_s:.1f} s |")


def run(cfg: BenchDataConfig) -> None:
    if getattr(cfg, "full_path", False):
        run_full(cfg)  # type: ignore[arg-type]
        return
    pipeline = _pipeline(cfg)
    transform, collator = _torch_path(cfg) if cfg.torch_path else (None, None)
    result = run_benchmark(pipeline, seconds=cfg.seconds, batch_transform=transform, collator=collator,
                           batch_size=cfg.batch_size)
    machine = f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    total = sum(result.stage_seconds.values()) or 1.0
    split = ", ".join(f"{k} {v / total:.0%}" for k, v in result.stage_seconds.items())
    logger.info("data benchmark %s (%s): mixture %s, buffer %d, aug %s", date.today(), machine, cfg.data_mix,
                cfg.shuffle_buffer_size, cfg.image_aug)
    print(f"| {cfg.shuffle_buffer_size:,} | {'on' if cfg.image_aug else 'off'} | {result.frames_per_second:.0f} "
          f"| {result.time_to_first_frame_s:.1f} s | {result.peak_rss_gib:.2f} GiB "
          f"| {result.rss_slope_gib_per_min:+.3f} GiB/min | {split or '-'} |")
