"""Iteration-level scheduling over the unified page pool (rank 0 only).

Each step: running sequences first get room for one more token (preempting
the newest running sequence, whose KV is freed and which is re-queued for
recomputation, when the pool runs out); then waiting sequences are admitted
FCFS while the step's token budget, the sequence cap and free pages (KV
blocks plus the adapter's pages if it is not resident) allow. A waiting
request whose adapter is still being fetched does not block those behind it.

Every pool call goes through `PoolLog`, which applies it to rank 0's pool
and records it; the other ranks replay the record in order, and because the
pool is deterministic, they end with the same page ids.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bdlora_ray.errors import PoolExhausted
from bdlora_ray.memory import PagePool
from bdlora_ray.request import GenerationRequest


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    req: GenerationRequest
    seq_id: int                         # pool key of its KV blocks
    arrival: float                      # monotonic seconds when it was queued
    tokens: list[int]                   # prompt + generated so far
    num_prompt: int
    generator: torch.Generator | None   # per-request RNG when seeded
    num_computed: int = 0               # tokens whose K/V are in the pool
    status: Status = Status.WAITING
    text: str = ""                      # decoded output emitted so far
    preemptions: int = 0
    detok: Any = None                   # its IncrementalDetokenizer (rank 0's engine sets it)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def adapter(self) -> str | None:
        return self.req.adapter


class PoolLog:
    """Applies pool operations on rank 0 and records them for the other ranks."""

    REPLAYABLE = ("allocate_kv", "free_kv", "load_adapter", "pin", "unpin", "evict_adapter")

    def __init__(self, pool: PagePool, apply: Callable[[str, tuple], Any]) -> None:
        self.pool = pool    # rank 0's pool, for reads
        self.apply = apply  # (op, args) -> result, the same function every rank replays with
        self.ops: list[list] = []

    def __call__(self, op: str, *args: Any) -> Any:
        assert op in self.REPLAYABLE, op
        result = self.apply(op, args)  # raises before recording: a failed op changed nothing
        self.ops.append([op, *args])
        return result

    def take(self) -> list[list]:
        ops, self.ops = self.ops, []
        return ops


@dataclass
class Step:
    """What one forward pass computes: per sequence, the rows it feeds in."""

    seqs: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # position of the first fed token
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, pool: PoolLog, max_num_seqs: int, max_num_batched_tokens: int,
                 adapter_ready: Callable[[str], bool]) -> None:
        self.log = pool
        self.pool = pool.pool
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.adapter_ready = adapter_ready  # shards on every rank's host, or already resident
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def release(self, seq: Sequence) -> None:
        """Free a sequence's KV and its adapter pin (finish, abort, preemption)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.log("free_kv", seq.seq_id)
            if seq.adapter is not None:
                self.log("unpin", seq.adapter)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.release(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)  # first in line again: FCFS by arrival

    def schedule(self) -> Step:
        step = Step()
        budget = self.max_tokens
        # 1. Decodes: room for the one token each running sequence feeds in.
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted below while making room for an older one
            while True:
                try:
                    self.log("allocate_kv", seq.seq_id, len(seq.tokens))
                    break
                except PoolExhausted:
                    victim = self.running[-1]
                    self._preempt(victim)
                    step.preempted.append(victim)
                    if victim is seq:
                        break
            if seq.status is Status.RUNNING:
                step.seqs.append(seq)
                step.starts.append(seq.num_computed)
                budget -= len(seq.tokens) - seq.num_computed
        # 2. Admissions, FCFS; a request whose adapter is still on its way waits aside.
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs:
                break
            if seq.adapter is not None and not self.adapter_ready(seq.adapter):
                continue
            need = len(seq.tokens)
            if need > budget and step.seqs:
                break
            if not self._admit(seq):
                break
            step.seqs.append(seq)
            step.starts.append(0)
            budget -= need
        return step

    def _admit(self, seq: Sequence) -> bool:
        name = seq.adapter
        try:
            if name is not None:
                if name not in self.pool:
                    self.log("load_adapter", name)
                self.log("pin", name)
        except PoolExhausted:
            return False
        try:
            self.log("allocate_kv", seq.seq_id, len(seq.tokens))
        except PoolExhausted:
            if name is not None:
                self.log("unpin", name)
            return False
        self.waiting.remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True
