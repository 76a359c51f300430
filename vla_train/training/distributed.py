"""Process group from the torchrun environment: NCCL on CUDA, gloo on CPU; world size 1 without torchrun.

A plain `python vla-scripts/train.py` still gets a (single-process) process group, so every code path — FSDP,
collectives, distributed checkpoints — is the same with and without torchrun (the reference crashed without it).
"""

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> DistributedContext:
    """Initialize (once) the default process group from RANK / WORLD_SIZE / LOCAL_RANK; collective."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        else:  # not launched by torchrun: a private single-process group
            if world_size != 1:
                raise ValueError(f"WORLD_SIZE={world_size} without MASTER_ADDR: launch multi-process runs with "
                                 "torchrun.")
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timedelta(minutes=timeout_minutes))
    return DistributedContext(rank, world_size, local_rank, local_world_size, device, backend)


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def collective_device() -> torch.device:
    """Where collective tensors of the default group must live: the current CUDA device for NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_agree(ok: bool) -> bool:
    """True when `ok` is True on every rank; collective (every rank must call it, also the ones that failed)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run_on_every_rank(work: Callable[[], Any], what: str) -> Any:
    """Run this rank's part of a step (`work`, possibly a no-op on some ranks), then agree with the other ranks
    (collective): a failure on any rank raises on every rank (its own error there, a RuntimeError naming `what` on
    the others) instead of leaving the others waiting in the next collective."""
    failure: Exception | None = None
    result = None
    try:
        result = work()
    except Exception as error:  # re-raised below, once the other ranks know
        failure = error
    if not all_ranks_agree(failure is None):
        if failure is not None:
            raise failure
        raise RuntimeError(f"Another rank failed while {what}; see its log.")
    return result


def barrier() -> None:
    """Collective: call on every rank."""
    if dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
