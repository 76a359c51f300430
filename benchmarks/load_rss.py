"""Host memory of loading a base VLM for training: peak RSS per rank, as training loads it, on CPU (gloo).

    python benchmarks/load_rss.py --scratch_dir /tmp/load_rss [--mode sharded|legacy] [--nproc 2] [--stage vla-train]

1. Writes once, into `--scratch_dir`, a base run directory of `--model_id` (default the MiniVLA base
   `prism-qwen25-extra-dinosiglip-224px+0_5b`: DINOv2-L + SigLIP-So400m + Qwen2.5-0.5B, ~1.2B parameters) with seeded
   random weights (registry architectures, no tokenizer needed, nothing downloaded).
2. Starts `--nproc` processes (a gloo group, as `torchrun` would), each measures its RSS after the imports and the
   process group (the baseline), resets its peak (`/proc/self/clear_refs`), loads and parallelizes the model through
   the functions `training/session.py` calls, in its order (`load_model`, `check_all_fp32`, `freeze_backbones`,
   `parallelize_vlm`, then `load_weights` for a meta-device model), and reports its peak RSS (VmHWM).
   `--mode legacy` loads as before issue #10: the full FP32 model on every rank (`load_base_vlm`), then
   `parallelize_vlm`. `--keep_file_pages` keeps rank 0's mapped checkpoint pages (no `madvise`), to show their cost.
3. Prints per rank and summed: peak RSS above the baseline, next to the model's FP32 size, and the ratio.
Linux only (/proc).
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import argparse
import gc
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

GIB = 1024**3
DEFAULT_MODEL = "prism-qwen25-extra-dinosiglip-224px+0_5b"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch_dir", type=Path, required=True, help="where the base run directory is written once")
    parser.add_argument("--mode", choices=("sharded", "legacy"), default="sharded")
    parser.add_argument("--model_id", default=DEFAULT_MODEL, help="a registered model id")
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks) of the gloo group")
    parser.add_argument("--stage", choices=("vla-train", "vla-full-train"), default="vla-train",
                        help="vla-train: frozen vision, cast to bf16 before sharding (the default VLA stage)")
    parser.add_argument("--strategy", default="full-shard")
    parser.add_argument("--keep_file_pages", action="store_true", help="sharded mode without dropping rank 0's "
                        "mapped checkpoint pages")
    return parser.parse_args(argv)


def status_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_base_run_dir(scratch_dir: Path, model_id: str) -> Path:
    """The model's base run directory under `scratch_dir` (written on the first call: seeded random weights)."""
    from vla_train.config.model import get_model_config
    from vla_train.models.build import build_vlm
    from vla_train.models.run_dir import CHECKPOINT_SUBDIR, LATEST_CHECKPOINT, save_base_vlm

    run_dir = scratch_dir / model_id
    if not (run_dir / CHECKPOINT_SUBDIR / LATEST_CHECKPOINT).is_file():
        start = time.perf_counter()
        model_cfg = get_model_config(model_id)
        vlm = build_vlm(model_cfg)
        save_base_vlm(vlm, model_cfg, run_dir)
        del vlm
        gc.collect()
        print(f"wrote {run_dir} in {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def train_config(run_dir: Path, stage: str, strategy: str, scratch_dir: Path):
    """A TrainConfig whose model part is this benchmark's (the tiny-test VLA with `run_dir` as its base VLM)."""
    from vla_train.config.train import TrainConfig
    from vla_train.config.vla import VLAConfig

    vla = replace(VLAConfig.get_choice_class("tiny-test")(), base_vlm=str(run_dir), train_strategy=strategy,
                  freeze_vision_backbone=stage == "vla-train")
    return TrainConfig(vla=vla, data_root_dir=scratch_dir / "no-data", run_root_dir=scratch_dir / "runs")


def load_as_training_does(cfg, ctx, mode: str):
    """`training/session.py::_build`'s model lines (the legacy mode: the full model on every rank first)."""
    from vla_train.models.build import check_all_fp32
    from vla_train.models.freezing import freeze_backbones
    from vla_train.models.run_dir import load_base_vlm
    from vla_train.training import session
    from vla_train.training.loading import is_on_meta, load_weights
    from vla_train.training.parallelize import parallelize_vlm

    vlm = load_base_vlm(cfg.vla.base_vlm) if mode == "legacy" else session.load_model(cfg)
    check_all_fp32(vlm)
    stage = cfg.vla.stage()
    freeze_backbones(vlm, stage)
    parallelize_vlm(vlm, ctx, strategy=cfg.vla.train_strategy, stage=stage,
                    mixed_precision=cfg.vla.enable_mixed_precision_training,
                    reduce_in_full_precision=cfg.vla.reduce_in_full_precision,
                    activation_checkpointing=cfg.vla.enable_gradient_checkpointing,
                    checkpoint_vision_blocks=cfg.vla.checkpoint_vision_blocks)
    if is_on_meta(vlm):
        load_weights(vlm, session.model_source(cfg), ctx)
    return vlm


def worker(rank: int, args: argparse.Namespace, run_dir: Path, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from vla_train.log import setup_logging
    from vla_train.training import loading, session  # noqa: F401  (every import before the baseline)
    from vla_train.training.distributed import barrier, destroy_distributed, init_distributed
    from vla_train.training.parallelize import parallelize_vlm  # noqa: F401

    setup_logging(rank)
    if args.keep_file_pages:
        loading._drop_file_pages = lambda tensor: None
    ctx = init_distributed()
    cfg = train_config(run_dir, args.stage, args.strategy, args.scratch_dir)
    gc.collect()
    baseline = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    vlm = load_as_training_does(cfg, ctx, args.mode)
    barrier()
    seconds = time.perf_counter() - start
    local = sum(p.to_local().numel() * p.element_size() for p in vlm.parameters())
    results.put((rank, baseline, status_kib("VmHWM"), status_kib("VmRSS"), local, seconds))
    destroy_distributed()


def fp32_bytes(model_id: str) -> int:
    from vla_train.config.model import get_model_config
    from vla_train.models.build import build_vlm

    with torch.device("meta"):
        vlm = build_vlm(get_model_config(model_id))
    return sum(p.numel() for p in vlm.parameters()) * 4


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("benchmarks/load_rss.py reads /proc: Linux only.")
    from vla_train.training.distributed import free_port

    args.scratch_dir.mkdir(parents=True, exist_ok=True)
    run_dir = write_base_run_dir(args.scratch_dir, args.model_id)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # a CPU gloo group, whatever the machine has
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(worker, args=(args, run_dir, free_port(), results), nprocs=args.nproc, join=True,
                       start_method="spawn")
    rows = sorted(results.get() for _ in range(args.nproc))
    model = fp32_bytes(args.model_id)
    mode = args.mode + (" (file pages kept)" if args.keep_file_pages else "")
    print(f"\n{args.model_id}: FP32 size {model / GIB:.2f} GiB; {args.nproc} ranks, mode {mode}, stage {args.stage}, "
          f"{args.strategy}")
    print(f"{'rank':>4} {'baseline GiB':>12} {'peak GiB':>9} {'peak-baseline GiB':>18} {'end-baseline GiB':>17} "
          f"{'local params GiB':>17} {'load s':>7}")
    above = 0.0
    for rank, baseline, peak, end, local, seconds in rows:
        above += (peak - baseline) * 1024 / GIB
        print(f"{rank:>4} {baseline * 1024 / GIB:>12.2f} {peak * 1024 / GIB:>9.2f} "
              f"{(peak - baseline) * 1024 / GIB:>18.2f} {(end - baseline) * 1024 / GIB:>17.2f} {local / GIB:>17.2f} "
              f"{seconds:>7.1f}")
    print(f"sum of peaks above baseline: {above:.2f} GiB = {above * GIB / model:.2f} x the FP32 model "
          f"(target <= 1.5 x)")


if __name__ == "__main__":
    main()
