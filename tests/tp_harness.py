"""Run our TP model on one rank, for the tests: load adapter shards into a
scattered page pool, run single and mixed batches, record logits and the
collectives issued. `spawn_tp` runs it on N gloo processes."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from bdlora_ray.attention import AttentionMeta
from bdlora_ray.comm import Comm, end_spawned_rank, init_distributed, leave_world
from bdlora_ray.config import LlamaConfig
from bdlora_ray.lora.batch import AdapterSlot, LoraBatch
from bdlora_ray.lora.layout import AdapterLayout
from bdlora_ray.lora.shard import load_peft_adapter, shard_adapter
from bdlora_ray.tp import TPModel

PAGE_ELEMS = 1000  # deliberately not a divisor of any row length


@dataclass
class Job:
    cfg: LlamaConfig
    checkpoint: str
    adapters: dict[str, tuple[str, str]]          # slot name -> (PEFT dir, mode)
    singles: list[tuple[str | None, list[int]]]   # (slot name or None, prompt)
    batch: list[tuple[str | None, list[int]]] = field(default_factory=list)


def load_pool(cfg: LlamaConfig, job: Job, tp_rank: int, tp: int) -> tuple[torch.Tensor, dict[str, AdapterSlot]]:
    shards = {name: shard_adapter(load_peft_adapter(path), cfg, tp, mode).ranks[tp_rank]
              for name, (path, mode) in job.adapters.items()}
    metas = {name: shard_adapter(load_peft_adapter(path), cfg, tp, mode).meta
             for name, (path, mode) in job.adapters.items()}
    layouts = {n: AdapterLayout.from_shard(cfg.num_layers, s) for n, s in shards.items()}
    total = sum(l.num_pages(PAGE_ELEMS) for l in layouts.values())
    pool = torch.full((cfg.num_layers, total + 3, PAGE_ELEMS), float("nan"))  # unused pages are poison
    free = torch.randperm(total + 3, generator=torch.Generator().manual_seed(7)).tolist()  # scattered
    slots = {}
    for name, layout in layouts.items():
        pages = torch.tensor([free.pop() for _ in range(layout.num_pages(PAGE_ELEMS))], dtype=torch.int32)
        layout.write_to_pool(shards[name], pool, pages)
        slots[name] = AdapterSlot(metas[name], layout, pages)
    return pool, slots


def forward(model: TPModel, pool, slots: dict[str, AdapterSlot], seqs: list[tuple[str | None, list[int]]],
            logits_rows: torch.Tensor | None = None):
    names = sorted({n for n, _ in seqs if n is not None})
    ids = torch.tensor([t for _, p in seqs for t in p])
    pos = torch.cat([torch.arange(len(p)) for _, p in seqs])
    idx = torch.cat([torch.full((len(p),), names.index(n) if n else -1) for n, p in seqs])
    lora = LoraBatch.build([slots[n] for n in names], idx, pool, model.cfg, model.comm.rank,
                           model.comm.world_size) if names else None
    model.comm.reset_counts()
    logits = model.forward(ids, pos, AttentionMeta([len(p) for _, p in seqs]), lora, logits_rows)
    return logits, dict(model.comm.counts)


def run(job: Job, comm: Comm) -> tuple[dict[str, torch.Tensor], dict]:
    model = TPModel(job.cfg, job.checkpoint, comm)
    pool, slots = load_pool(job.cfg, job, comm.rank, comm.world_size)
    out, counts = {}, {}
    for i, seq in enumerate(job.singles):
        out[f"single.{i}"], counts[f"single.{i}"] = forward(model, pool, slots, [seq])
    if job.batch:
        logits, counts["batch"] = forward(model, pool, slots, job.batch)
        row = 0
        for i, (_, p) in enumerate(job.batch):
            out[f"batch.{i}"] = logits[row:row + len(p)]
            out[f"alone.{i}"], _ = forward(model, pool, slots, [job.batch[i]])
            row += len(p)
        # As the engine asks: each sequence's last row only, which only rank 0 samples.
        last = torch.tensor([len(p) for _, p in job.batch]).cumsum(0) - 1
        sampled, counts["sampled"] = forward(model, pool, slots, job.batch, last)
        if sampled is not None:
            out["sampled"] = sampled
    return out, counts


def _worker(rank: int, world: int, init_file: str, job: Job, out_dir: str) -> None:
    torch.set_num_threads(1)
    comm = init_distributed(rank, world, f"file://{init_file}")
    out, counts = run(job, comm)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(counts))
    leave_world(barrier=True)
    end_spawned_rank()


def spawn_tp(job: Job, world: int) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """Run `job` on `world` gloo processes; return every rank's (logits, counts)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), job, d), nprocs=world, join=True)
        return [(load_file(os.path.join(d, f"rank{r}.safetensors")),
                 json.loads(Path(d, f"rank{r}.json").read_text())) for r in range(world)]
