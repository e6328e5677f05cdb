"""Iteration-level scheduling over the unified page pool (rank 0 only).

Each step has a token budget (`max_num_batched_tokens`, as vLLM's) shared by
decodes and prefills. Running sequences come first, decodes before prefills
still in progress: each gets room for the rows it feeds in (preempting the
newest running sequence, whose KV is freed and which is re-queued for
recomputation, when the pool runs out). Then waiting sequences are admitted
FCFS while the budget, the sequence cap and the pool allow. With chunked
prefill a prompt longer than what is left of the budget is fed in pieces
over several steps while the decodes go on; without it, such a prompt waits
for a step with room (or runs alone). Admission checks that the KV blocks of
the whole prompt and the adapter's pages fit together, before loading
anything; pages are then taken piece by piece.

Prefix caching: a sequence's full blocks are keyed by a hash chain whose
root names the adapter and its version (`cache_root`), so blocks are shared
only between requests of the same adapter version (or of the base model).
At admission the longest run of cached blocks of the prompt is shared
(leaving at least one token to compute, whose logits give the first token);
after each step the newly completed blocks are registered.

Every pool call goes through `PoolLog`, which applies it to rank 0's pool
and records it; the other ranks replay the record in order, and because the
pool is deterministic, they end with the same page ids.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections import Counter, deque
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
    cache_root: str | None = None       # root of its block hash chain (adapter + version); None: not cached
    block_hashes: list[str] = field(default_factory=list)  # hash of each full block of `tokens`, in order
    num_cached_blocks: int = 0          # its first blocks that are registered in the pool (or were hits)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def adapter(self) -> str | None:
        return self.req.adapter


class PoolLog:
    """Applies pool operations on rank 0 and records them for the other ranks."""

    REPLAYABLE = ("allocate_kv", "free_kv", "share_kv", "cache_blocks", "load_adapter", "pin", "unpin",
                  "evict_adapter")

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


def cache_root(adapter: str | None, version: str | None) -> str | None:
    """Root of the block hash chain of requests for `adapter` at `version` (None = base model):
    None when the version is unknown, which keeps such KV out of the cache."""
    if adapter is not None and version is None:
        return None
    return hashlib.sha256(json.dumps(["bdlora-prefix-v1", adapter, version]).encode()).hexdigest()


def block_hash(parent: str, tokens: list[int]) -> str:
    """Hash of a full block: its parent's hash (or the chain's root) and its token ids."""
    return hashlib.sha256(f"{parent}|{','.join(map(str, tokens))}".encode()).hexdigest()


@dataclass
class Step:
    """What one forward pass computes: per sequence, the rows it feeds in."""

    seqs: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # position of the first fed token
    counts: list[int] = field(default_factory=list)  # rows fed: tokens[start:start + count]
    preempted: list[Sequence] = field(default_factory=list)
    refused: list[Sequence] = field(default_factory=list)  # can never fit the pool: the engine fails them

    def add(self, seq: Sequence, start: int, count: int) -> None:
        self.seqs.append(seq)
        self.starts.append(start)
        self.counts.append(count)

    def drop(self, seq: Sequence) -> int:
        """Take a sequence out again (preempted later in the same step); returns its rows."""
        i = self.seqs.index(seq)
        del self.seqs[i], self.starts[i]
        return self.counts.pop(i)


class Scheduler:
    def __init__(self, pool: PoolLog, max_num_seqs: int, max_num_batched_tokens: int,
                 adapter_ready: Callable[[str], bool],
                 adapter_needs: Callable[[str], tuple[str | None, int] | None] = lambda name: None,
                 chunked_prefill: bool = True, prefix_caching: bool = True,
                 counters: Counter[str] | None = None) -> None:
        self.log = pool
        self.pool = pool.pool
        self.block_size = self.pool.config.block_size
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.adapter_ready = adapter_ready  # shards on every rank's host, or already resident
        self.adapter_needs = adapter_needs  # (version, pages a load takes) before loading; None: unknown
        self.chunked_prefill = chunked_prefill
        self.prefix_caching = prefix_caching
        self.counters = counters if counters is not None else Counter()
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
        seq.status, seq.num_computed, seq.num_cached_blocks = Status.WAITING, 0, 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)  # first in line again: FCFS by arrival

    def schedule(self) -> Step:
        step = Step()
        budget = self.max_tokens
        # 1. Running sequences: decodes (one row each) first, then prefills in progress, oldest first.
        for seq in sorted(self.running, key=lambda s: len(s.tokens) - s.num_computed > 1):
            if seq.status is not Status.RUNNING:
                continue  # preempted below while making room for an older one
            n = len(seq.tokens) - seq.num_computed
            if self.chunked_prefill:
                n = min(n, budget)
            if n <= 0:
                continue  # the budget is spent: it goes on next step
            if self._grow(seq, seq.num_computed + n, step):
                step.add(seq, seq.num_computed, n)
                budget -= n
        for victim in step.preempted:
            if victim in step.seqs:
                budget += step.drop(victim)
        # 2. Admissions, FCFS; a request whose adapter is still on its way waits aside. Not in a step
        # that preempted: the pool is short, and a preempted sequence would come straight back.
        for seq in [] if step.preempted else list(self.waiting):
            if len(self.running) >= self.max_num_seqs or budget <= 0:
                break
            if seq.adapter is not None and not self.adapter_ready(seq.adapter):
                continue
            n = self._admit(seq, budget, alone=not step.seqs)
            if n == 0:
                break
            step.add(seq, seq.num_computed, n)
            budget -= n
        return step

    def _grow(self, seq: Sequence, num_tokens: int, step: Step) -> bool:
        """Room for `num_tokens` of `seq`, preempting the newest running sequences if needed; False if
        `seq` itself had to go (preempted, or refused when it cannot fit even alone)."""
        while True:
            try:
                self.log("allocate_kv", seq.seq_id, num_tokens)
                return True
            except PoolExhausted:
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:  # alone, everything idle evicted: never fits
                    self.release(seq)
                    step.refused.append(seq)
                    return False
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    return False

    def _admit(self, seq: Sequence, budget: int, alone: bool) -> int:
        """Make `seq` running with room for its first rows; returns how many it feeds in (0: not now)."""
        name = seq.adapter
        needs = self.adapter_needs(name) if name is not None else (None, 0)
        version, adapter_pages = needs if needs is not None else (None, 0)
        hits = self._lookup(seq, name, version)
        start = len(hits) * self.block_size
        n = len(seq.tokens) - start
        if self.chunked_prefill:
            n = min(n, budget)
        elif n > budget and not alone:
            return 0
        # Room for the whole prompt (not only its first piece) and the adapter, checked before loading
        # anything: a prefill that cannot finish would be preempted, its adapter evicted and fetched again.
        blocks = -(-len(seq.tokens) // self.block_size) - len(hits)
        if blocks + adapter_pages > self.pool.available(keep=name, reuse=tuple(hits)):
            return 0
        try:
            if name is not None:
                if name not in self.pool:
                    self.log("load_adapter", name)
                self.log("pin", name)
        except PoolExhausted:  # its size was not known beforehand
            return 0
        if name is not None and self.pool.adapter(name).version != version:  # another version came in
            hits = self._lookup(seq, name, self.pool.adapter(name).version)
            start = len(hits) * self.block_size
            n = min(n, len(seq.tokens) - start) if self.chunked_prefill else len(seq.tokens) - start
        try:
            if hits:
                self.log("share_kv", seq.seq_id, hits)
            self.log("allocate_kv", seq.seq_id, start + n)
        except PoolExhausted:
            self.log("free_kv", seq.seq_id)
            if name is not None:
                self.log("unpin", name)
            return 0
        if seq.cache_root is not None:
            self.counters["prefix_cache_queries"] += len(seq.tokens)
            self.counters["prefix_cache_hits"] += start
        seq.num_computed, seq.num_cached_blocks = start, len(hits)
        self.waiting.remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return n

    # ---- prefix cache ---------------------------------------------------------

    def _lookup(self, seq: Sequence, adapter: str | None, version: str | None) -> list[int]:
        """Pages of the longest cached run of `seq`'s full blocks, at most all but its last token."""
        root = cache_root(adapter, version) if self.prefix_caching else None
        if root != seq.cache_root:
            seq.cache_root, seq.block_hashes = root, []
        if root is None:
            return []
        self._hash_blocks(seq, (len(seq.tokens) - 1) // self.block_size)
        pages = []
        for h in seq.block_hashes[:(len(seq.tokens) - 1) // self.block_size]:
            page = self.pool.cached_page(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[-1] if i else seq.cache_root
            seq.block_hashes.append(block_hash(parent, seq.tokens[i * bs:(i + 1) * bs]))

    def cache_computed(self, seqs: list[Sequence]) -> None:
        """After a step: register the blocks of `seqs` that are now full and computed."""
        for seq in seqs:
            full = seq.num_computed // self.block_size
            if seq.status is not Status.RUNNING or seq.cache_root is None or full <= seq.num_cached_blocks:
                continue
            self._hash_blocks(seq, full)
            self.log("cache_blocks", seq.seq_id, seq.num_cached_blocks, seq.block_hashes[seq.num_cached_blocks:full])
            seq.num_cached_blocks = full
