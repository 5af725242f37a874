"""Process groups for expert parallelism, set up in one place.

`init_ep()` reads the launcher's environment (torchrun or parallel/launch.py: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and picks the backend from the device: gloo on CPU, nccl
on CUDA. Attention tensor parallelism and expert parallelism share the same N ranks (DeepSpeed-MoE
inference's setting), so one group serves both.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_rt.errors import MoeRtError

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class EPGroup:
    """One rank's view of the expert-parallel group."""

    rank: int  # 0..world-1
    world: int  # N ranks
    group: object | None  # torch.distributed ProcessGroup; None when world == 1
    device: torch.device  # where this rank computes

    @property
    def is_main(self) -> bool:
        """Rank 0 prints and writes files; every rank computes."""
        return self.rank == 0


def single_rank(device: torch.device | str = "cpu") -> EPGroup:
    """A group of one (no torch.distributed): EP code paths run with no communication."""
    return EPGroup(0, 1, None, torch.device(device))


def init_ep(backend: str | None = None, timeout_s: float = 300.0) -> EPGroup:
    """Join the group described by the environment (or wrap an already initialised default group)."""
    if not dist.is_initialized():
        missing = [k for k in ENV_KEYS if k not in os.environ]
        if missing:
            raise MoeRtError(f"expert parallelism needs {', '.join(missing)} in the environment "
                             "(start the ranks with torchrun or parallel.launch)")
        cuda = torch.cuda.is_available() and backend != "gloo"
        backend = backend or ("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    backend = dist.get_backend()
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return EPGroup(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, device)


def destroy_ep(ep: EPGroup) -> None:
    if ep.group is not None and dist.is_initialized():
        dist.destroy_process_group()
