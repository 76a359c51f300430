"""Build everything a training run needs, in small factories: process group, run directory, model, data, FSDP,
optimizer, schedule, checkpoints, metrics. `build_session` validates the whole config before any work."""

import os
import random
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_train.config.train import TrainConfig, resolve_run_id, validate_train_config
from vla_train.data.interleave import PipelineConfig
from vla_train.data.prefetch import BatchPrefetcher
from vla_train.data.torch_dataset import RLDSDataset
from vla_train.log import logger, setup_logging
from vla_train.models.build import check_all_fp32
from vla_train.models.freezing import freeze_backbones
from vla_train.models.lora import apply_lora
from vla_train.models.vlm import PrismaticVLM
from vla_train.policies.base import Policy
from vla_train.training.checkpoint import CheckpointManager
from vla_train.training.checkpoint_state import training_states
from vla_train.training.closed_loop import check_closed_loop_eval
from vla_train.training.distributed import DistributedContext, init_distributed, run_on_every_rank
from vla_train.training.ema import ModelEMA
from vla_train.training.loading import (
    ModelSource,
    base_vlm_source,
    build_meta_vlm,
    is_on_meta,
    load_weights,
    run_dir_source,
)
from vla_train.training.optim import build_lr_scheduler, build_optimizer, num_training_steps, record_parameter_shapes
from vla_train.training.parallelize import parallelize_vlm
from vla_train.training.run_guard import RunPlan, prepare_run_dir, write_run_files


@dataclass
class TrainingSession:
    cfg: TrainConfig
    ctx: DistributedContext
    run_id: str
    run_dir: Path
    plan: RunPlan
    vlm: PrismaticVLM
    policy: Policy  # everything family-specific: inputs, loss, metrics (`--vla.policy.type`)
    dataset: RLDSDataset
    loader: BatchPrefetcher  # the training batches; its state_dict() (and dataset's) = frames consumed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpoints: CheckpointManager
    total_steps: int
    steps_per_epoch: int
    grad_accumulation_steps: int
    start_step: int = 0
    start_epoch: int = 0
    ema: ModelEMA | None = None  # EMA of the trainable weights (`--vla.ema_decay`), updated after each optimizer step


def seed_everything(seed: int, rank: int) -> None:
    """Explicit per-rank seeds for python, numpy and torch (model init is seeded separately, identically per rank)."""
    rank_seed = seed + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    os.environ["EXPERIMENT_GLOBAL_SEED"] = str(seed)


def model_source(cfg: TrainConfig) -> ModelSource:
    """The weights to train from, before any resume: a checkpoint to fine-tune from, else the base VLM."""
    if cfg.pretrained_checkpoint is not None and not cfg.is_resume:
        checkpoint = Path(cfg.pretrained_checkpoint)
        return run_dir_source(checkpoint.parents[1], checkpoint=checkpoint, policy=cfg.vla.policy)
    return base_vlm_source(cfg.vla.base_vlm, policy=cfg.vla.policy)


def load_model(cfg: TrainConfig) -> PrismaticVLM:
    """The model to train (the policy's, around the base VLM), FP32, on the meta device (no storage; its checkpoint
    checked on rank 0): its weights are loaded after `parallelize_vlm`, shard by shard (`training/loading.py`).
    Collective."""
    vlm = build_meta_vlm(model_source(cfg))
    if cfg.vla.lora.enabled:
        names = apply_lora(vlm, cfg.vla.lora)
        logger.info("LoRA r=%d alpha=%s on %d linear layers", cfg.vla.lora.rank, cfg.vla.lora.alpha, len(names))
    return vlm


def build_dataset(cfg: TrainConfig, ctx: DistributedContext, vlm: PrismaticVLM, policy: Policy) -> RLDSDataset:
    pipeline = PipelineConfig(
        data_root_dir=Path(cfg.data_root_dir), data_mix=cfg.vla.data_mix,
        resize_resolution=tuple(vlm.vision_backbone.default_image_resolution[1:]),
        shuffle_buffer_size=cfg.vla.shuffle_buffer_size, image_aug=cfg.image_aug, seed=cfg.seed, rank=ctx.rank,
        world_size=ctx.world_size, deterministic=cfg.deterministic_data, registry_dirs=tuple(cfg.registry_dirs),
        allow_missing_datasets=cfg.allow_missing_datasets, statistics_cache_dir=cfg.statistics_cache_dir,
        statistics_timeout_s=cfg.statistics_timeout_s, local_world_size=ctx.local_world_size,
        **policy.pipeline_overrides())
    return RLDSDataset(pipeline, policy.batch_transform(vlm), is_main_process=ctx.is_main)


def build_session(cfg: TrainConfig) -> TrainingSession:
    """Collective: call on every rank. Everything is validated (config, run directory, resume) before any work; the
    run files are written only once the model and data are built. On success rank 0 holds the run-directory lock
    (`session.plan.release()` drops it); on failure it is dropped here."""
    ctx = init_distributed()
    setup_logging(ctx.rank)
    validate_train_config(cfg, ctx.world_size)
    seed_everything(cfg.seed, ctx.rank)
    run_id = resolve_run_id(cfg, ctx.world_size)
    plan = prepare_run_dir(cfg, ctx, Path(cfg.run_root_dir) / run_id)
    try:
        return _build(cfg, ctx, run_id, plan)
    except BaseException:
        plan.release(failed=True)
        raise


def _build(cfg: TrainConfig, ctx: DistributedContext, run_id: str, plan: RunPlan) -> TrainingSession:
    vlm = load_model(cfg)
    check_all_fp32(vlm)
    stage = cfg.vla.stage()
    freeze_backbones(vlm, stage)
    policy = cfg.vla.policy.build()
    dataset = build_dataset(cfg, ctx, vlm, policy)
    policy.check_data(dataset.dataset_statistics)
    if cfg.eval_interval is not None:  # the renderer is probed on rank 0 only (it runs the evaluations)
        names = [spec.name for spec in dataset.plan.specs]
        run_on_every_rank(lambda: check_closed_loop_eval(cfg.sim_eval, names, cfg.vla.policy.camera_roles(),
                                                         probe_rendering=ctx.is_main),
                          "checking the closed-loop evaluation (--eval_interval)")
    # rank-0-only side effect: the run directory's config and statistics files (a failure raises on every rank)
    run_on_every_rank(lambda: write_run_files(cfg, plan, dataset.dataset_statistics) if ctx.is_main else None,
                      f"writing the run files of {plan.run_dir}")

    collator = policy.collator(vlm)
    # uint8 pixels from the background thread, normalized on the device (dataset.batch_transform stays float32)
    loader = BatchPrefetcher(dataset, replace(dataset.batch_transform, uint8_pixels=True), collator,
                             cfg.vla.per_device_batch_size, depth=cfg.prefetch_batches, device=ctx.device,
                             normalize=vlm.vision_backbone.get_image_transform().normalize_on_device)
    shapes = record_parameter_shapes(vlm)
    parallelize_vlm(vlm, ctx, strategy=cfg.vla.train_strategy, stage=stage,
                    mixed_precision=cfg.vla.enable_mixed_precision_training,
                    reduce_in_full_precision=cfg.vla.reduce_in_full_precision,
                    activation_checkpointing=cfg.vla.enable_gradient_checkpointing,
                    checkpoint_vision_blocks=cfg.vla.checkpoint_vision_blocks)
    if is_on_meta(vlm):  # load_model's model (a substitute, e.g. gpu_check's, may come with its weights)
        load_weights(vlm, model_source(cfg), ctx, stream=plan.resume_from is None)  # a resume loads its own
    optimizer = build_optimizer(vlm, cfg.vla.learning_rate, cfg.vla.weight_decay, shapes,
                                betas=tuple(cfg.vla.adam_betas), eps=cfg.vla.adam_eps)
    ema = ModelEMA(vlm, cfg.vla.ema_decay) if cfg.vla.ema_decay is not None else None  # a resume overwrites it
    total_steps = num_training_steps(cfg.vla.max_steps, cfg.vla.epochs, len(dataset), cfg.vla.global_batch_size)
    scheduler = build_lr_scheduler(optimizer, cfg.vla.lr_scheduler_type, total_steps, cfg.vla.warmup_ratio,
                                   cfg.vla.lr_decay_steps, cfg.vla.warmup_steps, cfg.vla.min_learning_rate)
    session = TrainingSession(
        cfg=cfg, ctx=ctx, run_id=run_id, run_dir=plan.run_dir, plan=plan, vlm=vlm,
        policy=policy, dataset=dataset, loader=loader, optimizer=optimizer, scheduler=scheduler,
        checkpoints=CheckpointManager(plan.run_dir, keep_last_k=cfg.keep_last_k,
                                      save_consolidated=cfg.save_consolidated, async_save=cfg.async_checkpoint,
                                      model_id=plan.model_config.get("type"),
                                      consolidated_files=partial(policy.write_checkpoint_files, vlm,
                                                                 dataset_statistics=dataset.dataset_statistics)),
        total_steps=total_steps,
        steps_per_epoch=max(1, len(dataset) // cfg.vla.global_batch_size),
        grad_accumulation_steps=cfg.vla.grad_accumulation_steps(ctx.world_size), ema=ema)
    if plan.resume_from is not None:
        train_state = session.checkpoints.load(plan.resume_from,
                                               *training_states(vlm, optimizer, scheduler, dataset, ema))
        session.start_step, session.start_epoch = int(train_state["step"]), int(train_state["epoch"])
        logger.info("Resumed exactly from %s at step %d", plan.resume_from, session.start_step)
    logger.info("Run %s: %d steps (%d per epoch), global batch %d = %d per device x %d ranks x %d accumulation",
                run_id, total_steps, session.steps_per_epoch, cfg.vla.global_batch_size,
                cfg.vla.per_device_batch_size, ctx.world_size, session.grad_accumulation_steps)
    return session
