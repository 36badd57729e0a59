"""torchrun integration: PyTorch's own DistributedDataParallel, no home-made engine.

Under `torchrun` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; we join the process group (nccl on
CUDA, gloo on CPU), wrap the model, and let only rank 0 write files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # The process group was created by init_distributed, so shutdown destroys it (a caller's group is left).
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun; a plain single process otherwise. A group the caller
    already set up is used as it is, and left to the caller."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    owns = not dist.is_initialized()
    info = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")), owns)
    if owns:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def pick_device(requested: str, info: Dist) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def wrap_model(model: nn.Module, info: Dist, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters only (frozen ones are not registered for gradient all-reduce)."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_mean(value: torch.Tensor, info: Dist) -> torch.Tensor:
    """Mean over ranks (identity in a single process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: Dist) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
