"""Held-out evaluation: the policy's metrics (OpenVLA: action-token accuracy and L1) on the validation split, reduced
across ranks.

Skipped, with a warning, when the held-out split cannot give every rank data (e.g. no `val` split and about ten
episodes or fewer, so `train[95%:]` is empty). The decision comes from the plan, which is identical on every rank.
"""

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from vla_train.data.interleave import MixturePlan
from vla_train.log import logger
from vla_train.training.distributed import all_reduce
from vla_train.training.session import TrainingSession
from vla_train.training.trainer import device_inputs


def held_out_available(plan: MixturePlan, world_size: int) -> bool:
    """Whether to evaluate, warning (naming the datasets) about what is skipped. Same answer on every rank."""
    empty = plan.without_held_out()
    if not plan.has_held_out(world_size):
        logger.warning("Skipping held-out evaluation: the held-out splits (val, else train[95%%:]) hold %d episode(s) "
                       "at most, fewer than the %d rank(s) need%s. Add a val split or more episodes to evaluate.",
                       max(plan.held_out_episodes, default=0), world_size,
                       f"; empty: {', '.join(empty)}" if empty else "")
        return False
    if empty:
        logger.warning("Held-out evaluation leaves out %s: no held-out episodes (no val split and too few episodes for "
                       "train[95%%:]).", ", ".join(empty))
    return True


def evaluate_held_out(session: TrainingSession, max_batches: int = 50) -> dict[str, float]:
    """Collective: every rank evaluates the same number of batches of its own shard of the held-out split."""
    s = session
    if not held_out_available(s.dataset.plan, s.ctx.world_size):
        return {}
    dataset = s.dataset.with_config(train=False, image_aug=False)
    loader = DataLoader(dataset, batch_size=s.cfg.vla.per_device_batch_size, collate_fn=s.loader.collate_fn)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= max_batches:
            break
    count = all_reduce(torch.tensor([len(batches)]), op=dist.ReduceOp.MIN)
    if int(count.item()) == 0:  # reduced: every rank takes this branch together
        logger.warning("Skipping held-out evaluation: a rank read no held-out frame (e.g. none has an instruction).")
        return {}
    names = [spec.name for spec in s.dataset.plan.specs]
    metrics = s.policy.metrics(s.vlm, names, s.ctx.device, prefix="Held-out")
    s.vlm.eval()
    autocast = torch.autocast(s.ctx.device.type, dtype=torch.bfloat16,
                              enabled=s.cfg.vla.enable_mixed_precision_training)
    with torch.no_grad(), autocast:
        for batch in batches[: int(count.item())]:
            inputs = device_inputs(s.policy, batch, s.ctx.device)
            metrics.add(batch, inputs, s.policy.forward(s.vlm, inputs, normalizer=None))
    s.vlm.train()
    return metrics.reduce()
