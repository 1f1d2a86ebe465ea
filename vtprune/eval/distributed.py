"""Rank, world size and the few collectives the runner needs, for `torchrun` and `accelerate launch` alike.

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); reading them and
initialising `torch.distributed` ourselves works under either without a launcher-specific code path.
Data parallel only: every rank holds a full model and evaluates the strided shard `todo[rank::world]`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Ranks finish their shards at different times; rank 0 waits at a barrier for the slowest, which on a long
# benchmark can take far longer than the default collective timeout.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistContext:
        ctx = cls(
            rank=int(os.environ.get("RANK", 0)),
            world=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
        ctx.init()
        return ctx

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self) -> None:
        """Join the process group (once per process); gloo on CPU, NCCL when this rank has a GPU."""
        if self.world <= 1 or dist.is_initialized():
            return
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)

    def barrier(self) -> None:
        if self.world > 1:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world <= 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def end_launched_process() -> None:
    """End a process started by `torchrun` / `accelerate launch` at once, once its work is written and its
    process group destroyed. A process that ran a DDP backward can hang in interpreter finalization (the
    autograd engine's and gloo's worker threads race the GIL teardown: pytorch/pytorch#190489, #38231); CI
    saw one such hang on a 2-core machine. Nothing is left to run at that point, so skip finalization."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shutdown() -> None:
    """Leave the process group cleanly at the end of a command."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
