"""`train(cfg)`: what `vla-scripts/train.py` runs — build the session, train, evaluate, always close."""

from dataclasses import dataclass

from vla_train.config.train import TrainConfig
from vla_train.log import logger
from vla_train.training.distributed import barrier, destroy_distributed
from vla_train.training.evaluate import evaluate_held_out
from vla_train.training.session import build_session
from vla_train.training.trainer import Trainer, TrainResult


@dataclass
class RunSummary:
    run_dir: str
    result: TrainResult
    held_out: dict[str, float]


def train(cfg: TrainConfig, evaluate: bool = True) -> RunSummary:
    """Collective: every rank calls it. Returns the run's summary (metrics are global, identical on every rank)."""
    session = None
    try:
        session = build_session(cfg)
        trainer = Trainer(session)
        try:
            result = trainer.run()
            held_out = evaluate_held_out(session) if evaluate and not result.stopped_by_signal else {}
            summary = RunSummary(str(session.run_dir), result, held_out)
            if session.ctx.is_main:
                _print_summary(summary)
            barrier()  # the last collective: rank 0 then waits for its closed-loop evaluations alone
            trainer.finish(result)
        finally:
            trainer.finalize()
        return summary
    finally:
        if session is not None:
            session.plan.release()
        destroy_distributed()


def _print_summary(summary: RunSummary) -> None:
    result = summary.result
    lines = [f"Run directory: {summary.run_dir}", f"Steps: {result.final_step}"]
    if result.first_loss is not None and result.last_loss is not None:
        lines.append(f"Loss: {result.first_loss:.4f} at the first logged step -> {result.last_loss:.4f} at the last")
    if summary.held_out:
        accuracy = summary.held_out.get("Held-out/Action Token Accuracy")
        if accuracy is not None:
            lines.append(f"Held-out action-token accuracy: {accuracy:.3f} (chance: {1 / 256:.4f})")
        if "Held-out/L1 Loss" in summary.held_out:
            baseline = summary.held_out.get("Held-out/Mean-Action L1 Loss")
            lines.append(f"Held-out L1 (normalized actions): {summary.held_out['Held-out/L1 Loss']:.4f}"
                         + ("" if baseline is None else f" (mean-action baseline: {baseline:.4f})"))
    logger.info("Training finished.\n  " + "\n  ".join(lines))
