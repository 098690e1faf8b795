"""Multi-process helpers (torchrun): rank queries, gradient averaging, rank-0-first work, shards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "init_from_env", "device_name", "average_gradients", "broadcast_parameters",
           "rank_zero_first", "shard", "barrier", "local_device", "destroy"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env() -> bool:
    """Initialise the process group from torchrun's environment (NCCL with GPUs, else gloo); idempotent."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when GPUs exist, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def device_name(initialised: bool) -> str:
    """The bundle's ``device`` under torchrun: this rank's device once ``init_from_env`` ran, else "auto"."""
    return str(local_device()) if initialised else "auto"


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flat buffer: data parallelism without a wrapper.

    Used instead of DistributedDataParallel because the two training stages use different sub-networks
    (MIM head + encoder, then encoder + decoder), which DDP's fixed reducer handles poorly.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def broadcast_parameters(module: torch.nn.Module) -> torch.nn.Module:
    """Give every rank rank 0's parameters and buffers (identical start, identical EMA teacher)."""
    if is_distributed():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
    return module


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creates data on disk), the others after it finished."""
    if is_distributed() and rank() != 0:
        dist.barrier()
    yield
    if is_distributed() and rank() == 0:
        dist.barrier()


def shard(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This rank's share of a list (round robin), so each volume is processed by exactly one rank."""
    index = rank() if index is None else index
    count = world_size() if count is None else count
    return list(items)[index::count]


def destroy() -> bool:
    """Leave the process group at the end of a torchrun workflow."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return True
