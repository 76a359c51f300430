"""Held-out evaluation is skipped, with a warning naming the datasets, when the held-out split cannot feed every rank."""

import logging
from types import SimpleNamespace

import pytest
import torch

from tests.data.rlds_fixtures import make_episodes, write_registry, write_rlds
from vla_train.data.interleave import PipelineConfig, plan_mixture
from vla_train.data.registry import load_registry
from vla_train.data.torch_dataset import RLDSDataset
from vla_train.training.evaluate import evaluate_held_out


def _session(root, name: str, world_size: int) -> SimpleNamespace:
    """The parts of a TrainingSession that evaluation touches before the model runs."""
    registry = load_registry(base_dir=write_registry(root / "registry", {name: {}}))
    cfg = PipelineConfig(data_root_dir=root / "data", data_mix=name, resize_resolution=(8, 8), shuffle_buffer_size=4)
    dataset = RLDSDataset(cfg, plan=plan_mixture(cfg, registry))
    return SimpleNamespace(dataset=dataset, loader=SimpleNamespace(collate_fn=list),
                           ctx=SimpleNamespace(world_size=world_size, device=torch.device("cpu")),
                           cfg=SimpleNamespace(vla=SimpleNamespace(per_device_batch_size=2)))


@pytest.mark.parametrize("episodes, world_size, held_out", [(10, 1, 0), (20, 2, 1)])
def test_evaluation_is_skipped_when_the_held_out_split_is_too_small(tmp_path, log_records, episodes, world_size,
                                                                    held_out):
    # no val split: train[95%:] of 10 episodes is empty; of 20 it is one episode, which two ranks cannot share
    write_rlds(tmp_path / "data", "few", {"train": make_episodes(episodes, 3, seed=0)})
    session = _session(tmp_path, "few", world_size)
    assert session.dataset.plan.held_out_episodes == [held_out]
    assert evaluate_held_out(session) == {}
    [warning] = {r.message for r in log_records.records if r.levelno == logging.WARNING and r.name == "vla_train"}
    assert "Skipping held-out evaluation" in warning and f"fewer than the {world_size} rank(s)" in warning
    if held_out == 0:
        assert f"few ({tmp_path / 'data' / 'few' / '1.0.0'})" in warning
