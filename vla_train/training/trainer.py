"""The training loop: accumulate, step, clip, log, save, stop — and nothing else.

Gradient accumulation is weighted by supervised tokens: every micro-batch's summed token loss is divided by the
number of supervised tokens in the whole global batch (all ranks, all micro-batches), so the update equals that of
one big batch whatever the padding. SIGTERM / SIGINT / SIGHUP / SIGUSR1 finish the current step, save (within a time
budget, see `StopSignal`) and exit cleanly; every rank learns of a stop through one small CPU all-reduce per step (a
gloo group: no device synchronisation).
"""

import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import draccus
import torch
import torch.distributed as dist

from vla_train.log import logger
from vla_train.training.metrics import ActionMetrics, ProgressBar, ThroughputMeter, reduce_metrics
from vla_train.training.session import TrainingSession
from vla_train.training.trackers import make_trackers

IGNORE_INDEX = -100


@dataclass
class TrainResult:
    final_step: int
    stopped_by_signal: bool
    logged: list[dict[str, float]] = field(default_factory=list)


# SIGHUP: an ssh hang-up (torchrun forwards it); SIGUSR1: the usual Slurm `--signal` pre-emption notice.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


@dataclass
class StopDecision:
    stop: bool
    save: bool
    reason: str = ""


class StopSignal:
    """Records stop signals instead of dying mid-step; `decide()` is collective (any rank stopping stops all).

    After a signal the checkpoint is saved only if the slowest rank's last save fits in `save_budget_s` from the
    signal: torchrun SIGKILLs its workers `--shutdown-timeout` (30 s) after it forwards a signal, and a save that
    the SIGKILL will cut off is not started (the periodic checkpoints are the safety net). None: always save.
    """

    def __init__(self, save_budget_s: float | None = None) -> None:
        self.save_budget_s = save_budget_s
        self.received_at: float | None = None
        self.last_save_s: float | None = None
        self._group = dist.new_group(backend="gloo", timeout=timedelta(minutes=30))
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("Received %s: finishing this step, then saving (if it fits) and exiting.",
                       signal.Signals(signum).name)
        if self.received_at is None:
            self.received_at = time.monotonic()

    def decide(self) -> StopDecision:
        """Collective over a gloo group (CPU tensors by design: no device synchronisation per step)."""
        elapsed = time.monotonic() - self.received_at if self.received_at is not None else 0.0
        flags = torch.tensor([float(self.received_at is not None), elapsed,
                              -1.0 if self.last_save_s is None else self.last_save_s], dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        requested, elapsed, last_save = bool(flags[0]), float(flags[1]), float(flags[2])
        if not requested:
            return StopDecision(stop=False, save=False)
        if self.save_budget_s is None or last_save < 0 or elapsed + last_save <= self.save_budget_s:
            return StopDecision(stop=True, save=True)
        return StopDecision(stop=True, save=False, reason=(
            f"the last save took {last_save:.1f} s and {elapsed:.1f} s have passed since the signal, over the "
            f"{self.save_budget_s:g} s budget (--signal_save_budget_s)"))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    pixels = batch["pixel_values"]
    pixels = {k: v.to(device, non_blocking=True) for k, v in pixels.items()} if isinstance(pixels, dict) \
        else pixels.to(device, non_blocking=True)
    return {"input_ids": batch["input_ids"].to(device, non_blocking=True),
            "attention_mask": batch["attention_mask"].to(device, non_blocking=True),
            "labels": batch["labels"].to(device, non_blocking=True), "pixel_values": pixels}


class Trainer:
    def __init__(self, session: TrainingSession) -> None:
        self.s = session
        cfg = session.cfg
        hparams = draccus.encode(cfg)  # the same content as config.json, as the reference logs it
        self.trackers = make_trackers(cfg.trackers, session.run_id, session.run_dir, hparams, cfg.wandb_project,
                                      cfg.wandb_entity, session.ctx.is_main, start_step=session.start_step)
        names = [spec.name for spec in session.dataset.plan.specs]
        self.metrics = ActionMetrics(session.action_tokenizer, names, session.vlm.num_patches, session.ctx.device)
        self.throughput = ThroughputMeter(session.ctx.device)
        self.progress = ProgressBar(session.total_steps, session.start_step, session.ctx.is_main)
        self.signal = StopSignal(cfg.signal_save_budget_s)

    def _global_token_count(self, batches: list[dict[str, Any]]) -> torch.Tensor:
        local = torch.tensor([float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches))])
        dist.all_reduce(local, group=self.signal._group)
        return local

    def _train_step(self, data_iter) -> float:
        s, cfg = self.s, self.s.cfg
        with self.throughput.waiting_for_data():
            batches = [next(data_iter) for _ in range(s.grad_accumulation_steps)]
        tokens_per_rank = self._global_token_count(batches).item() / s.ctx.world_size
        autocast = torch.autocast(s.ctx.device.type, dtype=torch.bfloat16,
                                  enabled=cfg.vla.enable_mixed_precision_training)
        for index, batch in enumerate(batches):
            s.vlm.set_requires_gradient_sync(index == len(batches) - 1)
            inputs = _to_device(batch, s.ctx.device)
            with autocast:
                output = s.vlm(**inputs, num_items_in_batch=tokens_per_rank)
            output.loss.backward()
            self.metrics.accumulate(output.logits.detach(), inputs["labels"], batch.get("dataset_names", []))
            self.throughput.count(inputs["labels"].shape[0],
                                  inputs["attention_mask"].sum() + inputs["labels"].shape[0] * s.vlm.num_patches,
                                  (inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in s.vlm.parameters() if p.requires_grad],
                                                   cfg.vla.max_grad_norm)
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        self.throughput.step()
        return grad_norm

    def run(self) -> TrainResult:
        s, cfg = self.s, self.s.cfg
        s.vlm.train()
        step, epoch = s.start_step, s.start_epoch
        result = TrainResult(final_step=step, stopped_by_signal=False)
        data_iter = iter(s.loader)
        try:
            while step < s.total_steps:
                grad_norm = self._train_step(data_iter)
                step += 1
                epoch = step // s.steps_per_epoch
                stop = self.signal.decide()
                paused = cfg.stop_after_steps is not None and step - s.start_step >= cfg.stop_after_steps
                last = step >= s.total_steps or stop.stop or paused
                if step % cfg.log_interval == 0 or last:
                    result.logged.append(self._log(step, epoch, grad_norm))
                if (step % cfg.save_interval == 0 or last) and (stop.save or not stop.stop):
                    self._save(step, epoch, result)
                if stop.stop or paused:
                    result.stopped_by_signal = stop.stop
                    self._report_stop(step, stop)
                    break
        finally:
            self.signal.restore()
            self.progress.close()
        result.final_step = step
        return result

    def _save(self, step: int, epoch: int, result: TrainResult) -> None:
        s = self.s
        started = time.monotonic()
        loss = result.logged[-1].get("VLA Train/Loss") if result.logged else None
        s.checkpoints.save(step, epoch, loss, model=s.vlm, optimizer=s.optimizer, scheduler=s.scheduler,
                           data_state=s.dataset.state_dict(), train_state={"step": step, "epoch": epoch})
        self.signal.last_save_s = time.monotonic() - started

    def _report_stop(self, step: int, stop: StopDecision) -> None:
        if not stop.stop:
            logger.warning("Stopped (stop_after_steps) after step %d; checkpoint saved: resume with --resume auto.",
                           step)
        elif stop.save:
            logger.warning("Stopped (signal) after step %d; checkpoint saved: resume with --resume auto.", step)
        else:
            latest = self.s.checkpoints.latest_complete()
            logger.warning("Stopped (signal) after step %d WITHOUT saving: %s. --resume auto continues from %s.",
                           step, stop.reason, latest.name if latest else "the start (no checkpoint yet)")

    def _log(self, step: int, epoch: int, grad_norm) -> dict[str, float]:
        s = self.s
        metrics = reduce_metrics(self.metrics, self.throughput)
        metrics.update({"VLA Train/Step": step, "VLA Train/Epoch": epoch,
                        "VLA Train/Learning Rate": s.scheduler.get_last_lr()[0],
                        "VLA Train/Grad Norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                                     else grad_norm)})
        for tracker in self.trackers:
            tracker.write(step, metrics)
        self.progress.update(step, metrics)
        return metrics

    def finalize(self) -> None:
        for tracker in self.trackers:
            tracker.finalize()
