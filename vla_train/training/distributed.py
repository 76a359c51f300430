"""Process group from the torchrun environment: NCCL on CUDA, gloo on CPU; world size 1 without torchrun.

A plain `python vla-scripts/train.py` still gets a (single-process) process group, so every code path — FSDP,
collectives, distributed checkpoints — is the same with and without torchrun (the reference crashed without it).

Every collective of the project goes through this module (`all_reduce`, `all_ranks_agree`, `broadcast_object`,
`barrier`), which puts its tensor on the device the group's backend takes: NCCL rejects the CPU tensors that gloo
accepts, so a CPU-only test suite cannot catch a misplaced tensor at the call site. `tests/test_collectives.py` checks
statically that no other module calls a `torch.distributed` tensor collective, and with `VLA_TRAIN_STRICT_COLLECTIVES=1`
(the e2e suite sets it) such a call raises at run time.
"""

import os
import socket
import sys
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


def free_port() -> int:
    """A free TCP port on the loopback interface (a private single-process group; tests' rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_layout(world_size: int) -> tuple[int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) from torchrun's environment. Without them in a multi-process job (srun, mpirun)
    every rank would silently take `cuda:0` and hybrid sharding would see one node: refuse with the fix."""
    missing = [name for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE") if name not in os.environ]
    if world_size > 1 and missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: each process's GPU and the node layout "
            "come from them. Fix: launch with torchrun, or export them from your launcher, e.g. under Slurm srun "
            "`LOCAL_RANK=$SLURM_LOCALID LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE`, under Open MPI "
            "`LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK LOCAL_WORLD_SIZE=$OMPI_COMM_WORLD_LOCAL_SIZE`.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if not 0 <= local_rank < local_world_size or world_size % local_world_size:
        raise ValueError(f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world_size}, WORLD_SIZE={world_size}: "
                         "need 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE and the same number of processes on every node.")
    return local_rank, local_world_size


def init_distributed(timeout_minutes: int = 30) -> DistributedContext:
    """Initialize (once) the default process group from RANK / WORLD_SIZE / LOCAL_RANK; collective."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank, local_world_size = _local_layout(world_size)
    if os.environ.get(STRICT_ENV) == "1":
        install_strict_collectives()
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
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timedelta(minutes=timeout_minutes))
    return DistributedContext(rank, world_size, local_rank, local_world_size, device, backend)


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def device_for(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device `group`'s collectives take tensors on: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device() -> torch.device:
    """Where collective tensors of the default group must live (see `device_for`)."""
    return device_for(None)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-reduce on the device `group`'s backend takes; returns the result on `tensor`'s device (in place when it
    is already there). Collective: call on every rank of `group`. Without a process group, returns `tensor`."""
    if not dist.is_initialized():
        return tensor
    work = tensor.to(device_for(group))
    dist.all_reduce(work, op=op, group=group)
    return work if work.device == tensor.device else work.to(tensor.device)


def all_ranks_agree(ok: bool) -> bool:
    """True when `ok` is True on every rank; collective (every rank must call it, also the ones that failed)."""
    flag = all_reduce(torch.tensor([1 if ok else 0], dtype=torch.int32), op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s copy of a small picklable object, on every rank; collective (torch places the pickled bytes on
    the current device under NCCL)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_tensor(tensor: torch.Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Rank `src`'s values of `tensor` (same shape and dtype on every rank), in place, through the device the
    backend takes; returns `tensor`. `src` is a rank of `group` (default: the world). Collective: call on every rank
    of `group`. Without a process group, returns `tensor`."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    work = tensor.to(collective_device()).contiguous()
    dist.broadcast(work, group_src=src, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


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


# === Strict mode: every tensor collective of the project goes through this module ===
STRICT_ENV = "VLA_TRAIN_STRICT_COLLECTIVES"
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
                      "reduce_scatter_tensor", "reduce_scatter", "gather", "scatter", "all_to_all_single")


def _strict(name: str, collective: Callable[..., Any]) -> Callable[..., Any]:
    def checked(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("vla_train.") and caller != __name__:
            raise RuntimeError(
                f"{caller} calls torch.distributed.{name} directly. Route it through vla_train.training.distributed "
                "(all_reduce, all_ranks_agree, broadcast_object), which puts the tensor on the device the backend "
                "takes: NCCL rejects CPU tensors that gloo accepts.")
        return collective(*args, **kwargs)

    checked.vla_strict_original = collective  # type: ignore[attr-defined]
    return checked


def install_strict_collectives() -> None:
    """Make direct `torch.distributed` tensor collectives called from `vla_train` modules (other than this one)
    raise; torch's own and the tests' calls pass. Idempotent."""
    for name in TENSOR_COLLECTIVES:
        collective = getattr(dist, name)
        if not hasattr(collective, "vla_strict_original"):
            setattr(dist, name, _strict(name, collective))
