"""Collective helpers: tensors on the device the group's backend takes, and failures agreed across ranks."""

import pytest
import torch

from vla_train.training import distributed


def test_collective_tensors_go_to_the_cuda_device_under_nccl(monkeypatch):
    """NCCL rejects CPU tensors that gloo accepts: under NCCL the helpers must use the current CUDA device."""
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *args: "nccl")
    monkeypatch.setattr(distributed.torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *args: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


def test_the_router_reduces_on_the_device_of_the_groups_backend(monkeypatch):
    seen = []

    def all_reduce(tensor, op, group):
        seen.append((tensor.device, op, group))

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "device_for", lambda group: torch.device("meta"))  # stands in for cuda
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    with pytest.raises((RuntimeError, NotImplementedError)):  # copying the result back out of meta: it went there
        distributed.all_ranks_agree(True)
    assert seen == [(torch.device("meta"), distributed.dist.ReduceOp.MIN, None)]


def test_run_on_every_rank_without_a_process_group():
    assert distributed.run_on_every_rank(lambda: 5, "adding") == 5
    with pytest.raises(OSError, match="disk full"):
        distributed.run_on_every_rank(lambda: (_ for _ in ()).throw(OSError("disk full")), "writing")


@pytest.mark.parametrize("missing", [["LOCAL_RANK"], ["LOCAL_WORLD_SIZE"], ["LOCAL_RANK", "LOCAL_WORLD_SIZE"]])
def test_a_multi_process_launch_without_local_rank_is_refused(monkeypatch, missing):
    """srun / mpirun without torchrun: every rank would take cuda:0 and hybrid sharding would see one node."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for name in missing:
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match=rf"WORLD_SIZE=4 but {' and '.join(missing)} not set.*SLURM_LOCALID"):
        distributed._local_layout(4)


def test_local_layout_from_torchrun_and_single_process(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed._local_layout(1) == (0, 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed._local_layout(4) == (1, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="same number of processes on every node"):
        distributed._local_layout(4)
