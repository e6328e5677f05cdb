"""The collectives a TP rank issues, behind one small interface that counts them.

Counting is how tests check that BD-LoRA adds no communication: `counts`
maps a collective's kind to how many times this rank issued it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


class Comm:
    """TP=1: nothing to communicate, so nothing is issued or counted."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks, in place."""
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        """Stack every rank's `t`: (world_size, *t.shape)."""
        return t.unsqueeze(0)

    def gather(self, t: Tensor, dst: int = 0) -> Tensor | None:
        """Every rank's `t` stacked on rank `dst` only: (world_size, *t.shape) there, None elsewhere."""
        return t.unsqueeze(0)

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        return t

    def reset_counts(self) -> None:
        self.counts.clear()


class DistComm(Comm):
    """Collectives over an initialised torch.distributed group (gloo on CPU, nccl on GPU)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # Gloo has no all_gather_into_tensor for every device and version; NCCL prefers it.
        self.nccl = dist.get_backend(group) == "nccl"

    def all_reduce(self, t: Tensor) -> Tensor:
        self.counts["all_reduce"] += 1
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        self.counts["all_gather"] += 1
        t = t.contiguous()
        out = torch.empty((self.world_size, *t.shape), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t, group=self.group) if self.nccl else \
            dist.all_gather(list(out.unbind(0)), t, group=self.group)
        return out

    def gather(self, t: Tensor, dst: int = 0) -> Tensor | None:
        self.counts["gather"] += 1
        t = t.contiguous()
        if self.rank != dst:
            dist.gather(t, None, dst=dst, group=self.group)
            return None
        out = torch.empty((self.world_size, *t.shape), dtype=t.dtype, device=t.device)
        dist.gather(t, list(out.unbind(0)), dst=dst, group=self.group)
        return out

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        self.counts["broadcast"] += 1
        dist.broadcast(t, src=src, group=self.group)
        return t


def init_distributed(rank: int, world_size: int, init_method: str, backend: str | None = None,
                     local_rank: int | None = None) -> DistComm:
    """Join (or form) the default process group; gloo on CPU, nccl when CUDA is there.

    With CUDA, the process first binds its GPU: `local_rank` (default: rank modulo the GPUs it
    sees; 0 for a Ray actor, which sees only its own). NCCL takes the current device at its
    set-up, so without this every rank of a process that sees several GPUs would use GPU 0."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank if local_rank is not None else rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return DistComm()


def leave_world(barrier: bool = False) -> None:
    """Leave this process's torch.distributed world (at exit, or before joining a new one).

    A gloo rank that exits while a peer still holds a connection to it can abort the peer at
    its own exit ("terminate called without an active exception"); with `barrier`, every rank
    first waits for the others, so the world is torn down by all ranks together."""
    if not dist.is_initialized():
        return
    try:
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # a broken world (a peer died) may not tear down cleanly
        log.warning("torch.distributed did not shut down cleanly", exc_info=True)


def end_spawned_rank() -> NoReturn:
    """End a spawned TP rank's process now, status 0, once its results are written and it has left the
    world: the interpreter's teardown is skipped. Under load, a native thread of torch's CPU stack
    can abort a process in that teardown ("terminate called without an active exception", after the
    last Python frame), which would fail a run whose work was complete."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
