"""One-GPU throughput check: MiniVLA-size and OpenVLA-7B-architecture models, random weights, the demo data.

`python vla-scripts/gpu_check.py [--models minivla 7b] [--steps 200] [--json out.json]` trains each model for
`--steps` steps through the project's real path (`vla_train.training.entry.train`: FSDP2 on a 1-GPU mesh, bf16
autocast over FP32 master weights, non-reentrant activation checkpointing of the decoder layers, the real data
pipeline and loop) and prints samples/s, model TFLOP/s per device, MFU, peak device memory and data-wait fraction,
averaged over the logging windows after `--warmup_steps`, as a table (and JSON).

Nothing is downloaded and nothing big is written. Three in-process substitutions (undone afterwards) make that so:
- the model: `session.load_model` builds `model_id` from its registry config with random weights, directly on the
  GPU (no base-VLM run directory: the 7B one would be a 30 GB file), embeddings sized as the released tokenizer
  sizes them (Llama-2: 32064 rows);
- the tokenizer: the full-size ids need the released tokenizer from the local Hugging Face cache; where it is
  absent, `find_local_tokenizer` returns the project's tiny tokenizer of the same style (`build_tiny_tokenizer`:
  "llama" for Llama-2, "qwen" for Qwen2.5, whose MiniVLA extra tokens are then added as usual), so prompts are
  character-level (longer text than the real tokenizers give; FLOPs are counted from the real token counts);
- checkpoints: `Trainer._save` is skipped (the final checkpoint of the 7B model would be ~120 GB with optimizer).
The throughput meter gets the model's `FlopsModel` and the device's bf16 peak (`--peak_tflops` overrides).
"""

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from vla_train.log import logger

# name -> (base VLM model id, default per-device batch size)
CHECK_MODELS: dict[str, tuple[str, int]] = {
    "minivla": ("prism-qwen25-extra-dinosiglip-224px+0_5b", 32),
    "7b": ("prism-dinosiglip-224px+7b", 8),
}
METRIC_KEYS = {  # table column -> logged metric
    "samples/s": "VLA Train/Samples per Second",
    "TFLOP/s/dev": "VLA Train/Model TFLOPS per Device",
    "MFU": "VLA Train/MFU",
    "peak mem GiB": "VLA Train/Peak Device Memory GiB",
    "data wait": "VLA Train/Data Wait Fraction",
    "step s": "VLA Train/Step Time",
}


@dataclass(frozen=True)
class CheckArgs:
    models: tuple[str, ...]
    steps: int
    warmup_steps: int
    log_interval: int
    batch_size: int | None
    peak_tflops: float | None
    llm_layers: int | None
    work_dir: Path
    json_path: Path | None


def parse_args(argv: Sequence[str] | None = None) -> CheckArgs:
    """Command-line arguments; ValueErrors name the bad value and the fix."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CHECK_MODELS), choices=list(CHECK_MODELS))
    parser.add_argument("--steps", type=int, default=200, help="training steps per model")
    parser.add_argument("--warmup_steps", type=int, default=20, help="steps left out of the averages")
    parser.add_argument("--log_interval", type=int, default=10, help="steps per logging window")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"per-device batch size (default: {({k: v[1] for k, v in CHECK_MODELS.items()})})")
    parser.add_argument("--peak_tflops", type=float, default=None, help="bf16 peak TFLOP/s per device (override)")
    parser.add_argument("--llm_layers", type=int, default=None,
                        help="build the LLMs with this many decoder layers (same layer shapes; to fit memory/time)")
    parser.add_argument("--work_dir", type=Path, default=Path("runs/gpu_check"), help="demo data and run directories")
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="write the results here as JSON")
    ns = parser.parse_args(argv)
    args = CheckArgs(tuple(ns.models), ns.steps, ns.warmup_steps, ns.log_interval, ns.batch_size, ns.peak_tflops,
                     ns.llm_layers, ns.work_dir, ns.json_path)
    if args.log_interval < 1 or args.warmup_steps < 0:
        raise ValueError(f"--log_interval {args.log_interval} must be >= 1 and --warmup_steps {args.warmup_steps} "
                         ">= 0.")
    if args.steps < args.warmup_steps + args.log_interval:
        raise ValueError(f"--steps {args.steps} leaves no logging window after --warmup_steps {args.warmup_steps} "
                         f"(windows of --log_interval {args.log_interval}). Fix: pass --steps >= "
                         f"{args.warmup_steps + args.log_interval}.")
    if args.llm_layers is not None and args.llm_layers < 1:
        raise ValueError(f"--llm_layers {args.llm_layers} must be >= 1 (or left out for the full depth).")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size} must be >= 1.")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        raise ValueError(f"--peak_tflops {args.peak_tflops} must be a positive number (TFLOP/s), e.g. 989.")
    return args


class CudaUnavailableError(RuntimeError):
    """No CUDA device: the check cannot run."""


def require_cuda() -> torch.device:
    """The current CUDA device, or a CudaUnavailableError saying this check needs one (before any work)."""
    if not torch.cuda.is_available():
        raise CudaUnavailableError("gpu_check needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
                                   "False). Fix: run it on a GPU machine (check nvidia-smi and CUDA_VISIBLE_DEVICES).")
    return torch.device("cuda", torch.cuda.current_device())


# === The in-process substitutions ===


def _build_random_vlm(model_id: str, device: torch.device, llm_layers: int | None = None):
    """`model_id` with random weights on `device`, FP32, embeddings sized for the real tokenizer; with `llm_layers`,
    its LLM cut to that many decoder layers."""
    from vla_train.config.model import get_model_config
    from vla_train.models.build import build_vlm
    from vla_train.models.llm import get_llm_backbone_spec, padded_vocab_rows

    model_cfg = get_model_config(model_id)
    if llm_layers is not None:
        architecture = get_llm_backbone_spec(model_cfg.llm_backbone_id).architecture
        model_cfg = replace(model_cfg, llm_config={**architecture, "num_hidden_layers": llm_layers})
    with torch.device(device):
        vlm = build_vlm(model_cfg)
    backbone = vlm.llm_backbone
    spec = backbone.spec
    real_len = spec.tokenizer_len + (1 if spec.pad_token else 0) + spec.extra_tokens
    rows = backbone.llm.get_input_embeddings().weight.shape[0]
    if padded_vocab_rows(rows, real_len) != rows:
        backbone.llm.resize_token_embeddings(padded_vocab_rows(rows, real_len), mean_resizing=False)
    return vlm


def _tokenizer_or_tiny(real_finder):
    """`find_local_tokenizer`, falling back to the project's tiny tokenizer of the backbone's style."""
    from vla_train.models.tokenizers import build_tiny_tokenizer

    def find(spec, llm_max_length):
        tokenizer = real_finder(spec, llm_max_length)
        if tokenizer is None:
            style = "qwen" if spec.family == "qwen2" else "llama"
            logger.warning("gpu_check: no local tokenizer for %s; using the project's tiny %r tokenizer.",
                           spec.backbone_id, style)
            tokenizer = build_tiny_tokenizer(style, model_max_length=llm_max_length)
        return tokenizer

    return find


class _CheckMeter:
    """Builds the trainer's ThroughputMeter with the model's FlopsModel and the peak. Until the trainer passes
    `text_lengths`, a micro-batch's FLOPs are estimated from its mean length (`tokens / B`), which undercounts the
    small attention term by the length variance only."""

    def __init__(self, meter_cls: type, peak_flops: float | None) -> None:
        self.meter_cls, self.peak_flops = meter_cls, peak_flops
        self.vlm = None

    def __call__(self, device: torch.device | str = "cpu", *args: Any, **kwargs: Any):
        from vla_train.training.flops import flops_model_for_vlm

        kwargs["flops_model"] = flops_model_for_vlm(self.vlm)
        kwargs["peak_flops_per_device"] = self.peak_flops
        meter = self.meter_cls(device, *args, **kwargs)
        real_count = meter.count

        def count(samples, tokens, supervised_tokens, text_lengths=None):
            if text_lengths is None:  # tokens = sum of (text + patches) positions over the micro-batch
                mean_text = torch.as_tensor(tokens, dtype=torch.float64) / samples - meter.flops_model.num_patches
                text_lengths = mean_text.expand(samples)
            real_count(samples, tokens, supervised_tokens, text_lengths=text_lengths)

        meter.count = count
        return meter


@contextmanager
def project_substitutions(model_id: str, device: torch.device, peak_flops: float | None,
                          llm_layers: int | None = None) -> Iterator[_CheckMeter]:
    """The substitutions of the module docstring, for the duration of one `train(cfg)`."""
    from vla_train.models import llm as llm_module
    from vla_train.training import metrics, session, trainer

    factory = _CheckMeter(metrics.ThroughputMeter, peak_flops)

    def load_model(cfg):
        factory.vlm = _build_random_vlm(model_id, device, llm_layers)
        return factory.vlm

    def skip_save(self, step, epoch, result, **_):
        logger.info("gpu_check: checkpoint at step %d skipped.", step)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(session, "load_model", load_model))
        stack.enter_context(mock.patch.object(llm_module, "find_local_tokenizer",
                                              _tokenizer_or_tiny(llm_module.find_local_tokenizer)))
        stack.enter_context(mock.patch.object(trainer, "ThroughputMeter", factory))
        stack.enter_context(mock.patch.object(trainer.Trainer, "_save", skip_save))
        yield factory


# === The runs ===


def train_config(args: CheckArgs, name: str, data_root: Path):
    """A one-GPU TrainConfig for check model `name` on the demo mixture (no trackers but jsonl, no evaluation)."""
    from vla_train.config.train import TrainConfig
    from vla_train.config.vla import VLAConfig

    model_id, default_batch = CHECK_MODELS[name]
    batch = args.batch_size or default_batch
    vla = replace(VLAConfig.get_choice_class("tiny-test")(), vla_id=f"gpu-check-{name}", base_vlm=model_id,
                  max_steps=args.steps, expected_world_size=1, global_batch_size=batch, per_device_batch_size=batch,
                  learning_rate=2e-5, lr_scheduler_type="constant", warmup_ratio=0.0, train_strategy="full-shard",
                  enable_gradient_checkpointing=True, enable_mixed_precision_training=True,
                  shuffle_buffer_size=2000)
    return TrainConfig(vla=vla, data_root_dir=data_root, run_root_dir=args.work_dir / "runs",
                       run_id=f"gpu-check-{name}", trackers=("jsonl",), overwrite=True, log_interval=args.log_interval,
                       save_interval=10**9, signal_save_budget_s=None)


def read_logged(run_dir: Path) -> list[dict[str, float]]:
    """Every logged window of a run: the lines of its `<run_id>.jsonl` (the jsonl tracker's file)."""
    path = run_dir / f"{run_dir.name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_windows(logged: list[dict[str, float]], warmup_steps: int) -> dict[str, float]:
    """Mean of each METRIC_KEYS figure over the windows ending after `warmup_steps` (max for peak memory)."""
    windows = [entry for entry in logged if entry.get("VLA Train/Step", 0) > warmup_steps]
    summary: dict[str, float] = {"windows": float(len(windows))}
    for column, key in METRIC_KEYS.items():
        values = [entry[key] for entry in windows if key in entry]
        if values:
            summary[column] = max(values) if "mem" in column else sum(values) / len(values)
    return summary


def run_model(args: CheckArgs, name: str, data_root: Path, device: torch.device) -> dict[str, Any]:
    """Train check model `name` for `args.steps` steps on `device` (CUDA; CPU in tests); its summary (plus model id,
    batch, device, wall time)."""
    from vla_train.training.entry import train
    from vla_train.training.flops import resolve_peak_flops

    peak = resolve_peak_flops(device, args.peak_tflops)
    cfg = train_config(args, name, data_root)
    started = time.monotonic()
    with project_substitutions(CHECK_MODELS[name][0], device, peak, args.llm_layers):
        summary = train(cfg, evaluate=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "model_id": CHECK_MODELS[name][0], "batch": cfg.vla.per_device_batch_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "peak_tflops": None if peak is None else peak / 1e12, "llm_layers": args.llm_layers,
            "wall_s": time.monotonic() - started, **summarize_windows(read_logged(Path(summary.run_dir)),
                                                                      args.warmup_steps)}


def format_table(results: list[dict[str, Any]]) -> str:
    """Results as a fixed-width text table (missing figures as '-')."""
    columns = ["model", "batch", *METRIC_KEYS]
    rows = [[str(r.get("model")), str(r.get("batch"))] + [
        "-" if col not in r else f"{r[col]:.1%}" if col in ("MFU", "data wait") else f"{r[col]:.2f}"
        for col in METRIC_KEYS] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse, check for CUDA (fail fast), write the demo data, run each model, print the table, write the JSON."""
    args = parse_args(argv)
    device = require_cuda()
    from vla_train.data.demo import write_demo_datasets

    data_root = args.work_dir / "demo_data"
    write_demo_datasets(data_root)
    results = [run_model(args, name, data_root, device) for name in args.models]
    print(format_table(results), flush=True)
    if args.json_path is not None:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(results, indent=2))
        print(f"Results written to {args.json_path}", flush=True)
    return results


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` for the script: a bad argument or a missing GPU is one line on stderr and exit status 2."""
    try:
        main(argv)
    except (ValueError, CudaUnavailableError) as error:
        if isinstance(error, ValueError) and not _is_argument_error(error):
            raise
        print(f"gpu_check: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


def _is_argument_error(error: ValueError) -> bool:
    flags = ("--steps", "--log_interval", "--batch_size", "--peak_tflops", "--llm_layers")
    return any(str(error).startswith(flag) for flag in flags)
