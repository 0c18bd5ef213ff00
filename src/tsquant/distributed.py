"""Data-parallel training under ``torchrun`` (DistributedDataParallel; NCCL on GPUs, gloo on CPU).

``torchrun --nproc-per-node N -m tsquant train|codes|finetune|run CONFIG`` starts N processes;
each trains on its shard of every batch (``data.batch_size`` is the global batch, split evenly),
DDP averages the gradients, and rank 0 alone writes checkpoints, solves step 2, evaluates and
exports while the other ranks wait. Outside torchrun everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# step 2 or an evaluation on rank 0 can take hours on big models; the other ranks wait that long
WAIT = timedelta(hours=24)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_WORLD = World()


def world() -> World:
    return _WORLD


def init_from_env(device: str) -> tuple[World, str]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (world, this rank's device)."""
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _WORLD, device
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=WAIT)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        device = f"cuda:{_WORLD.local_rank}"
        torch.cuda.set_device(device)
    return _WORLD, device


def shutdown() -> None:
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def barrier() -> None:
    if _WORLD.active:
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64), e.g. of per-rank loss sums and sample counts."""
    if not _WORLD.active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    if not _WORLD.active:
        return model
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard_batch_size(batch_size: int) -> int:
    if batch_size % _WORLD.world_size:
        raise ValueError(
            f"data.batch_size={batch_size} does not split over {_WORLD.world_size} processes: "
            "use a multiple of the process count"
        )
    return batch_size // _WORLD.world_size
