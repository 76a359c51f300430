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


def test_all_ranks_agree_reduces_on_the_collective_device(monkeypatch):
    seen = {}

    def all_reduce(tensor, op):
        seen["device"], seen["op"] = tensor.device, op

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    with pytest.raises(RuntimeError, match="meta"):  # .item() on the meta device: the tensor really went there
        distributed.all_ranks_agree(True)
    assert seen == {"device": torch.device("meta"), "op": distributed.dist.ReduceOp.MIN}


def test_run_on_every_rank_without_a_process_group():
    assert distributed.run_on_every_rank(lambda: 5, "adding") == 5
    with pytest.raises(OSError, match="disk full"):
        distributed.run_on_every_rank(lambda: (_ for _ in ()).throw(OSError("disk full")), "writing")
