"""Held-out evaluation: action-token accuracy and L1 on the validation split, reduced across ranks."""

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from vla_train.training.metrics import ActionMetrics
from vla_train.training.session import TrainingSession
from vla_train.training.trainer import _to_device


def evaluate_held_out(session: TrainingSession, max_batches: int = 50) -> dict[str, float]:
    """Collective: every rank evaluates the same number of batches of its own shard of the held-out split."""
    s = session
    dataset = s.dataset.with_config(train=False, image_aug=False)
    loader = DataLoader(dataset, batch_size=s.cfg.vla.per_device_batch_size, collate_fn=s.loader.collate_fn)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= max_batches:
            break
    count = torch.tensor([len(batches)])
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    names = [spec.name for spec in s.dataset.plan.specs]
    metrics = ActionMetrics(s.action_tokenizer, names, s.vlm.num_patches, s.ctx.device, prefix="Held-out")
    s.vlm.eval()
    autocast = torch.autocast(s.ctx.device.type, dtype=torch.bfloat16,
                              enabled=s.cfg.vla.enable_mixed_precision_training)
    with torch.no_grad(), autocast:
        for batch in batches[: int(count.item())]:
            inputs = _to_device(batch, s.ctx.device)
            output = s.vlm(**inputs)
            metrics.accumulate(output.logits, inputs["labels"], batch.get("dataset_names", []))
    s.vlm.train()
    return metrics.reduce()
