"""The training loop: accumulate, step, clip, log, save, stop — and nothing else.

Gradient accumulation is weighted by the policy's loss weight (supervised tokens for token losses, valid chunk elements
for continuous ones): every micro-batch's summed loss is divided by the loss weight of the whole global batch (all
ranks, all micro-batches), so the update equals that of one big batch whatever the padding. Everything
family-specific (inputs, loss, metrics, token counts) comes from the session's `Policy`; the loop never branches on
the family. Gradients stay sharded: FSDP2 reduce-scatters every micro-batch's gradient and
accumulates it into the sharded `.grad` (no unsharded fp32 gradient lives across micro-batches). Between logging
steps nothing waits for the device: the loss weight is a CPU all-reduce of counts taken from the CPU batches, and
the grad norm stays a device tensor until a logging step. SIGTERM / SIGINT / SIGHUP / SIGUSR1 finish the current
step, save (within a time budget, see `StopSignal`) and exit cleanly; every rank learns of a stop through one small
CPU all-reduce per step (a gloo group: no device synchronisation).
"""

import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import draccus
import torch
import torch.distributed as dist

from vla_train.data.prefetch import DEVICE_INPUTS
from vla_train.log import logger
from vla_train.training.checkpoint_state import TRAIN_STATE, DictState, training_states
from vla_train.training.closed_loop import ClosedLoopEvaluator, sim_metrics
from vla_train.training.distributed import DistributedContext, all_reduce
from vla_train.training.flops import flops_model_for_vlm, resolve_peak_flops
from vla_train.training.metrics import ProgressBar, ThroughputMeter, reduce_metrics
from vla_train.training.plots import plot_run
from vla_train.training.trackers import make_trackers

if TYPE_CHECKING:  # the session builds the data pipeline: not needed to import the loop
    from vla_train.policies.base import Policy, PolicyOutput
    from vla_train.training.session import TrainingSession

LOSS_KEY = "VLA Train/Loss"
# Called after each micro-batch's backward with (the CPU batch, its device inputs, the policy output).
MicroBatchHook = Callable[[dict[str, Any], dict[str, Any], Any], None]


@dataclass
class TrainResult:
    """A run's outcome, of bounded size however long the run: the first and last logged loss and the last logged
    metrics (identical on every rank), not every logged dict."""

    final_step: int
    stopped_by_signal: bool
    first_loss: float | None = None
    last_loss: float | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    num_logged: int = 0

    def record(self, metrics: dict[str, float]) -> None:
        """Keep what the summary and checkpoint names need from one logging step's metrics."""
        self.last_metrics = metrics
        self.num_logged += 1
        loss = metrics.get(LOSS_KEY)
        if loss is not None:
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss


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
        flags = all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        requested, elapsed, last_save = bool(flags[0]), float(flags[1]), float(flags[2])
        if not requested:
            return StopDecision(stop=False, save=False)
        if self.save_budget_s is None or last_save < 0 or elapsed + last_save <= self.save_budget_s:
            return StopDecision(stop=True, save=True)
        return StopDecision(stop=True, save=False, reason=(
            f"the last save took {last_save:.1f} s and {elapsed:.1f} s have passed since the signal, over the "
            f"{self.save_budget_s:g} s budget (--signal_save_budget_s)"))

    @property
    def group(self) -> dist.ProcessGroup:
        """The gloo group of the per-step CPU collectives."""
        return self._group

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def device_inputs(policy: "Policy", batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The model inputs of a collated CPU batch on `device`. A prefetched batch (`BatchPrefetcher`) brings them
    staged (copied ahead on a side stream, uint8 pixels normalized on the device), popped here so that the device
    tensors die with the micro-batch; otherwise the policy copies the batch's tensors (float pixels) as they are."""
    staged = batch.pop(DEVICE_INPUTS, None)
    if staged is not None:
        return staged.take()
    pixels = batch.get("pixel_values")
    if pixels is not None and any(p.dtype == torch.uint8 for p in (pixels.values() if isinstance(pixels, dict)
                                                                   else [pixels])):
        raise ValueError("uint8 pixel_values need device normalization: iterate a BatchPrefetcher (or pass float "
                         "pixels from ImageTransform.__call__).")
    return policy.device_inputs(batch, device)


def global_loss_weight(policy: "Policy", batches: Sequence[dict[str, Any]],
                       group: dist.ProcessGroup | None = None) -> float:
    """The elements the global batch's loss sums over (every rank, every micro-batch: supervised tokens, valid chunk
    elements, per `policy.loss_weight`). Counted on the CPU batches before they move to the device and summed by a
    CPU all-reduce (`group` must be gloo): it never waits for the device."""
    local = torch.tensor([sum(policy.loss_weight(b) for b in batches)], dtype=torch.float64)
    return all_reduce(local, group=group).item()


def accumulate_gradients(model: torch.nn.Module, batches: Sequence[dict[str, Any]], ctx: DistributedContext, *,
                         policy: "Policy", mixed_precision: bool, token_group: dist.ProcessGroup | None = None,
                         on_micro_batch: MicroBatchHook | None = None) -> None:
    """Forward and backward every micro-batch of one optimizer step on an FSDP2 model (collective).

    Each micro-batch's summed loss is divided by the global loss weight over the world size (FSDP averages gradients
    over ranks), so the accumulated gradient is that of one big batch. Gradient sync stays on for every micro-batch
    (torchtitan's choice): FSDP2 reduce-scatters each micro-batch's gradient and accumulates it into the sharded
    `.grad`, so no unsharded gradient (fp32: 4 bytes per trainable parameter per rank) outlives a micro-batch, at the
    cost of one reduce-scatter per micro-batch instead of per step.
    """
    normalizer = global_loss_weight(policy, batches, token_group) / ctx.world_size
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=mixed_precision)
    model.set_requires_gradient_sync(True)
    for batch in batches:
        inputs = device_inputs(policy, batch, ctx.device)
        with autocast:
            output = policy.forward(model, inputs, normalizer)
        output.loss.backward()
        if on_micro_batch is not None:
            on_micro_batch(batch, inputs, output)


class Trainer:
    def __init__(self, session: "TrainingSession") -> None:
        self.s = session
        self.ema = session.ema  # None without --vla.ema_decay
        cfg = session.cfg
        hparams = draccus.encode(cfg)  # the same content as config.json, as the reference logs it
        self.trackers = make_trackers(cfg.trackers, session.run_id, session.run_dir, hparams, cfg.wandb_project,
                                      cfg.wandb_entity, session.ctx.is_main, start_step=session.start_step)
        names = [spec.name for spec in session.dataset.plan.specs]
        self.metrics = session.policy.metrics(session.vlm, names, session.ctx.device)
        self.throughput = ThroughputMeter(
            session.ctx.device, flops_model=flops_model_for_vlm(session.vlm),
            peak_flops_per_device=resolve_peak_flops(session.ctx.device, cfg.peak_device_tflops))
        self.progress = ProgressBar(session.total_steps, session.start_step, session.ctx.is_main)
        self.signal = StopSignal(cfg.signal_save_budget_s)
        self.closed_loop = None if cfg.eval_interval is None else ClosedLoopEvaluator(
            cfg.sim_eval, cfg.eval_interval, session.run_dir, cfg.sim_eval.device or str(session.ctx.device),
            session.ctx.is_main)

    def _count(self, batch: dict[str, Any], inputs: dict[str, Any], output: "PolicyOutput") -> None:
        """Metrics and throughput of one micro-batch, accumulated on the device (no sync)."""
        self.metrics.add(batch, inputs, output)
        counts = self.s.policy.token_counts(self.s.vlm, inputs)
        self.throughput.count(counts.samples, counts.positions, counts.supervised, text_lengths=counts.text_lengths)

    def _train_step(self, data_iter: Iterator[dict[str, Any]]) -> torch.Tensor:
        """One optimizer step; returns the grad norm as a device tensor (converted to float on logging steps only)."""
        s, cfg = self.s, self.s.cfg
        with self.throughput.waiting_for_data():
            batches = [next(data_iter) for _ in range(s.grad_accumulation_steps)]
        accumulate_gradients(s.vlm, batches, s.ctx, policy=s.policy,
                             mixed_precision=cfg.vla.enable_mixed_precision_training, token_group=self.signal.group,
                             on_micro_batch=self._count)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in s.vlm.parameters() if p.requires_grad],
                                                   cfg.vla.max_grad_norm)
        s.optimizer.step()
        if self.ema is not None:
            self.ema.update()  # every rank, its own shards: no sync
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
                evaluate = self.closed_loop is not None and self.closed_loop.due(step, s.total_steps) \
                    and not stop.stop
                if step % cfg.log_interval == 0 or last:
                    result.record(self._log(step, epoch, grad_norm))
                if (step % cfg.save_interval == 0 or last or evaluate) and (stop.save or not stop.stop):
                    self._save(step, epoch, result, final=last, signal_stop=stop.stop)
                if evaluate:
                    s.checkpoints.wait()  # collective: the evaluated checkpoint is committed before it is read
                    self.closed_loop.launch(step)
                self._log_closed_loop(self.closed_loop.poll() if self.closed_loop is not None else [])
                if stop.stop or paused:
                    result.stopped_by_signal = stop.stop
                    self._report_stop(step, stop)
                    break
            s.checkpoints.wait()  # commit a save still written in the background (raises if it failed)
        finally:
            self.signal.restore()
            self.progress.close()
            s.loader.close()  # stop the prefetch thread (a later iteration restarts it at the consumed position)
        result.final_step = step
        return result

    def _save(self, step: int, epoch: int, result: TrainResult, *, final: bool, signal_stop: bool) -> None:
        """Periodic saves run in the background (`--async_checkpoint`); the last one waits for its commit. The
        consolidated `.pt` follows `--save_consolidated`, except that a signal stop (with its time budget) writes
        it only with `every`: `--resume` and export work from the sharded checkpoint alone."""
        s = self.s
        loss = result.last_metrics.get(LOSS_KEY)
        states, per_rank = training_states(s.vlm, s.optimizer, s.scheduler, s.dataset, self.ema)
        states[TRAIN_STATE] = DictState({"step": step, "epoch": epoch})
        consolidate = False if signal_stop and s.cfg.save_consolidated != "every" else None
        s.checkpoints.save(step, epoch, loss, states, per_rank, final=final, consolidate=consolidate)
        self.signal.last_save_s = s.checkpoints.last_save_s

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

    def _log(self, step: int, epoch: int, grad_norm: torch.Tensor) -> dict[str, float]:
        """Reduce the window's metrics across ranks (collective; the one device sync of a window) and write them."""
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

    def _log_closed_loop(self, finished: list[tuple[int, dict[str, Any]]]) -> None:
        """Rank 0: write finished closed-loop evaluations as metrics of their steps (`Sim/<task> Success`)."""
        for step, results in finished:
            for tracker in self.trackers:
                tracker.write(step, sim_metrics(step, results))

    def finish(self, result: TrainResult) -> None:
        """Rank 0, after the ranks' last collective (the others may have exited): wait for the closed-loop
        evaluations and log them, then plot the run (`plots/*.png`). Nothing here may fail a finished run. After a
        stop signal nothing waits (`finalize` terminates a running evaluation)."""
        if not self.s.ctx.is_main or result.stopped_by_signal:
            return
        if self.closed_loop is not None:
            finished = self.closed_loop.wait()
            self._log_closed_loop(finished)
            if finished:
                from vla_train.sim.evaluate import results_table

                step, results = finished[-1]
                logger.info("Closed-loop evaluation of step %d:\n%s", step, results_table(results))
        try:
            written = plot_run(self.s.run_dir)
            logger.info("Plots: %s", ", ".join(str(path) for path in written) or "none (no metrics yet)")
        except Exception as error:  # a plotting problem must not fail a run whose checkpoints are saved
            logger.warning("Could not plot the run (%s: %s); try vla-scripts/plot_run.py --run_dir %s.",
                           type(error).__name__, error, self.s.run_dir)

    def finalize(self) -> None:
        """Every rank, always: end this rank's background checkpoint write and any closed-loop evaluation still
        running (a failed or stopped run), close the trackers."""
        self.s.checkpoints.close()  # after a failure: this rank's background write ends before the process does
        if self.closed_loop is not None:
            self.closed_loop.close()
        for tracker in self.trackers:
            tracker.finalize()
