"""One TP rank: its model shard, its unified page pool, its adapter shards.

Rank 0 schedules (`bdlora_ray.engine`) and broadcasts each step as a small
JSON message over a gloo group (`StepChannel`); the other ranks run
`serve_forever`, replaying the message's pool operations and then the same
forward pass. No Ray here: the replica group (`bdlora_ray.group`) puts these
in actors; tests may also run them in plain processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from bdlora_ray.attention import AttentionMeta
from bdlora_ray.comm import Comm
from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import AdapterNotFound
from bdlora_ray.lora.batch import LoraBatch
from bdlora_ray.lora.layout import AdapterLayout
from bdlora_ray.lora.slots import SlotTables
from bdlora_ray.lora.shard import AdapterMeta, load_peft_adapter, shard_adapter
from bdlora_ray.memory import PagePool, PoolConfig
from bdlora_ray.tp import TPModel

log = logging.getLogger(__name__)


class ShardSource(Protocol):
    def get_shard(self, name: str, tp_rank: int) -> tuple[AdapterMeta, dict[str, Tensor], str | None]:
        """This rank's validated shard of adapter `name` and the adapter's version (a digest of all
        its files: it changes when the adapter is pushed again; None if unknown, which keeps its KV
        out of the prefix cache); typed errors otherwise. A (meta, shard) pair means version None."""


class LocalShardSource:
    """Adapters from local PEFT directories, converted on demand."""

    def __init__(self, adapters: dict[str, tuple[str, str | None]], cfg: LlamaConfig, tp: int) -> None:
        self.adapters, self.cfg, self.tp = adapters, cfg, tp  # name -> (PEFT dir, mode or None)

    def get_shard(self, name: str, tp_rank: int) -> tuple[AdapterMeta, dict[str, Tensor], str]:
        if name not in self.adapters:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        path, mode = self.adapters[name]
        digest = hashlib.sha256(repr(mode).encode())
        for f in sorted(Path(path).iterdir()):
            if f.is_file():
                digest.update(f.name.encode() + b"\0" + f.read_bytes())
        shards = shard_adapter(load_peft_adapter(path, name), self.cfg, self.tp, mode)
        return shards.meta, shards.ranks[tp_rank], digest.hexdigest()


def _with_version(shard: tuple) -> tuple[AdapterMeta, dict[str, Tensor], str | None]:
    return (shard[0], shard[1], shard[2] if len(shard) > 2 else None)


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class StepChannel:
    """Rank 0 -> all ranks: one JSON message per step, over a CPU (gloo) group."""

    def __init__(self, world_size: int, group: dist.ProcessGroup | None = None) -> None:
        self.world_size, self.group = world_size, group
        self.sent = 0  # messages broadcast (tests compare it with steps)

    def send(self, msg: dict) -> None:
        if self.world_size == 1:
            return
        data = json.dumps(msg, separators=(",", ":")).encode()
        dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), 0, group=self.group)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)
        self.sent += 1

    def recv(self) -> dict:
        n = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(n, 0, group=self.group)
        buf = torch.empty(int(n), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.group)
        return json.loads(buf.numpy().tobytes())


class TPWorker:
    def __init__(self, cfg: LlamaConfig, checkpoint: str, comm: Comm, pool_config: PoolConfig,
                 source: ShardSource, channel: StepChannel, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_host_bytes: int = 1 << 30) -> None:
        self.cfg, self.comm, self.source, self.channel = cfg, comm, source, channel
        self.rank = comm.rank
        self.model = TPModel(cfg, checkpoint, comm, device, dtype)
        # Per-slot kernel metadata, written as adapters enter the pool and read by every step.
        self.slots = SlotTables(cfg, self.rank, comm.world_size, pool_config.device)
        self.pool = PagePool(pool_config, listener=self.slots)
        self.kv_views = [self.pool.kv_cache(layer) for layer in range(cfg.num_layers)]
        # Fetched, not yet in the pool, oldest first; at most max_host_bytes of them (see fetch_adapter).
        self.host: OrderedDict[str, tuple[AdapterMeta, dict[str, Tensor], str | None]] = OrderedDict()
        self.max_host_bytes = max_host_bytes
        # fetch_adapter runs on the engine's fetch threads, several at once, beside the loop's loads.
        self._host_lock = threading.Lock()
        self.steps = 0
        # The pool's usage as of the last message applied: read by other threads instead of the pool,
        # which only the thread that runs the steps touches. It changes only through pool operations.
        self.usage_snapshot = self.pool.usage().to_dict()

    # ---- adapters ----------------------------------------------------------

    def fetch_adapter(self, name: str) -> int:
        """Bring this rank's shard of `name` into host memory; returns its bytes."""
        entry = _with_version(self.source.get_shard(name, self.rank))
        tensors = entry[1]
        with self._host_lock:
            self.host.pop(name, None)
            self.host[name] = entry
            # A shard whose requests went away (aborted, expired) never gets its load op: without a bound
            # such shards would pile up. The oldest go first; a load op that still comes fetches again.
            while len(self.host) > 1 and sum(_nbytes(e[1]) for e in self.host.values()) > self.max_host_bytes:
                dropped, _ = self.host.popitem(last=False)
                log.info("rank %d: dropped fetched adapter %s, never loaded (host budget %d bytes)",
                         self.rank, dropped, self.max_host_bytes)
        return _nbytes(tensors)

    def apply(self, op: str, args: tuple | list) -> Any:
        """One pool operation, as rank 0 recorded it."""
        if op == "load_adapter":
            (name,) = args
            with self._host_lock:
                entry = self.host.get(name)
            if entry is None:  # not prefetched (plain-process runs), or dropped by the budget: fetch now
                self.fetch_adapter(name)
                with self._host_lock:
                    entry = self.host.get(name)
                if entry is None:  # dropped again at once by other fetches' budget: use a private copy
                    entry = _with_version(self.source.get_shard(name, self.rank))
            meta, tensors, version = entry
            slot = self.pool.load_adapter(name, tensors, meta, version=version)
            with self._host_lock:
                self.host.pop(name, None)  # the pool holds it now
            return slot
        return getattr(self.pool, op)(*args)

    def adapter_needs(self, name: str) -> tuple[str | None, int] | None:
        """(version, pages a load would take) of adapter `name`, from the pool or this rank's host copy;
        None when neither holds it (a load would fetch it first)."""
        if name in self.pool:
            return self.pool.adapter(name).version, 0
        with self._host_lock:
            entry = self.host.get(name)
        if entry is None:
            return None
        layout = AdapterLayout.from_shard(self.cfg.num_layers, entry[1])
        return entry[2], layout.num_pages(self.pool.config.elems_per_page)

    # ---- steps -------------------------------------------------------------

    def execute(self, seqs: list[list]) -> Tensor:
        """Run one step. seqs: [seq_id, adapter or None, first position, token ids].

        Returns the logits of each sequence's last row: (len(seqs), vocab).
        """
        ids = torch.tensor([t for s in seqs for t in s[3]], dtype=torch.long)
        lens = [len(s[3]) for s in seqs]
        positions = torch.cat([torch.arange(s[2], s[2] + len(s[3])) for s in seqs])
        meta = AttentionMeta(
            seq_lens=lens, context_lens=[s[2] for s in seqs], kv_cache=self.kv_views,
            page_tables=[torch.tensor(self.pool.kv_page_table(s[0])) for s in seqs],
            block_size=self.pool.config.block_size)
        lora = None
        if any(s[1] is not None for s in seqs):
            slot_of_seq = torch.tensor([self.pool.adapter(s[1]).slot if s[1] is not None else -1 for s in seqs])
            idx = slot_of_seq.repeat_interleave(torch.tensor(lens))  # (T,) row -> slot
            lora = LoraBatch.from_tables(self.slots, idx, self.pool.data)
        last_rows = torch.tensor(lens).cumsum(0) - 1
        self.steps += 1
        return self.model.forward(ids, positions, meta, lora, last_rows)

    def run_message(self, msg: dict) -> Tensor | None:
        for op in msg["ops"]:
            self.apply(op[0], op[1:])
        if msg["ops"]:
            self.usage_snapshot = self.pool.usage().to_dict()
        return self.execute(msg["seqs"]) if msg["seqs"] else None

    def serve_forever(self) -> None:
        """Ranks > 0: follow rank 0's steps until it says stop."""
        while True:
            msg = self.channel.recv()
            if msg.get("stop"):
                log.info("rank %d: stop after %d steps", self.rank, self.steps)
                return
            self.run_message(msg)
