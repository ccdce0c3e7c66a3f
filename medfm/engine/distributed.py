"""Data-parallel training on torch's own engine: ``torchrun`` sets RANK / WORLD_SIZE /
LOCAL_RANK, each process joins the process group (NCCL on CUDA, gloo on the CPU), and the
engine wraps the task's module in ``DistributedDataParallel``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place in a run: rank, world size and the device it computes on."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints, the model and logs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (as they are, in one process)."""
        if self.world == 1 or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if self.device.type == "cuda":  # NCCL reduces device tensors only
            t = t.to(self.device)
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()


def setup_distributed(device: torch.device) -> Dist:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group and, on CUDA, take this
    process's GPU (LOCAL_RANK); otherwise a single process on ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


__all__ = ["Dist", "setup_distributed"]
