"""Every collective the trainer uses, in one small module (the library's models and objectives have none).

Launched by torchrun, a process joins the process group (gloo on CPU, NCCL on CUDA); launched plainly it is rank 0
of 1, and every function here is then a no-op, so the same trainer code runs either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``x`` over ranks in place (and return it)."""
    if info.distributed:
        dist.all_reduce(x)
    return x


def all_gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def row_gatherer(info: DistInfo) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None:
    """For contrastive objectives: [b, P] on each rank -> ([W*b, P] in rank order, this rank's first row), with
    gradients flowing back to every rank's slice. None on one process (the batch is already whole)."""
    if not info.distributed:
        return None
    from torch.distributed.nn.functional import all_gather

    def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return torch.cat(all_gather(x), dim=0), info.rank * x.shape[0]

    return gather
