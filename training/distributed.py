"""DistributedDataParallel set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

The same command runs alone or under ``torchrun --nproc-per-node N`` (and multi-node): gloo on
CPU, nccl on CUDA.  Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str) -> Dist:
    """Join the process group if launched by torchrun; pins this rank's GPU on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank, world, local)


def mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a scalar over ranks (for logging: every rank sees the same number)."""
    if d.enabled:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= d.world_size
    return value


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
