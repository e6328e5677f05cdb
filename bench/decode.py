"""Decode throughput of a TP replica group, in one run, as ratios.

Two plain processes (gloo) run the engine exactly as a replica group does:
rank 0 schedules and broadcasts each step, rank 1 follows. Scenarios:
(a) a batch of B sequences using no LoRA, 1, 16 or 64 distinct adapters
(BD-LoRA, mode bd); (b) 16 distinct adapters of the same rank served
bd vs slora vs replicated. Decode tokens/s is timed over steps in which every
sequence decodes (prefill and adapter loads excluded).

    python -m bench decode [--tp 2] [--batch 64] [--steps 8] [--rank 16] [--json PATH]

On this CPU the LoRA part runs the torch kernel backend; the ratios,
not the absolute numbers, are the result. Prints a table, ratios last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bdlora_ray.comm import init_distributed
from bdlora_ray.config import LlamaConfig
from bdlora_ray.engine import Engine, EngineConfig
from bdlora_ray.memory import PoolConfig
from bdlora_ray.request import GenerationRequest, SamplingParams
from bdlora_ray.synthetic import random_adapter, write_peft_adapter, write_random_checkpoint
from bdlora_ray.tokenizer import load_tokenizer
from bdlora_ray.worker import LocalShardSource, StepChannel, TPWorker

DEFAULT_JSON = Path(__file__).parent / "out" / "decode.json"


def scenarios(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(label, mode, distinct adapters; 0 = base model only)."""
    out = [("no LoRA", "bd", 0)] + [(f"{n} adapter{'s' * (n > 1)} (bd)", "bd", n) for n in (1, 16, 64)
                                   if n <= args.batch]
    k = min(16, args.batch)
    if k not in (1, 16):
        out.append((f"{k} adapters (bd)", "bd", k))
    k = min(16, args.batch)
    return out + [(f"{k} adapters {m}", m, k) for m in ("slora", "replicated")]


def make_files(args: argparse.Namespace, cfg: LlamaConfig, root: Path) -> dict[str, tuple[str, str]]:
    write_random_checkpoint(cfg, root / "model", seed=0)
    adapters = {}
    for i in range(64):
        bd = write_peft_adapter(random_adapter(cfg, args.rank, nblocks=args.tp, seed=i), root / f"bd{i}")
        adapters[f"bd{i}"] = (str(bd), "bd")
    for i in range(16):
        lora = write_peft_adapter(random_adapter(cfg, args.rank, seed=100 + i), root / f"lora{i}")
        adapters[f"slora{i}"] = (str(lora), "slora")
        adapters[f"replicated{i}"] = (str(lora), "replicated")
    return adapters


def _worker(rank: int, args: argparse.Namespace, root: str, adapters: dict, init: str, result: str) -> None:
    torch.set_num_threads(1)
    cfg = LlamaConfig.from_json(Path(root) / "model", name="tiny")
    comm = init_distributed(rank, args.tp, init)
    channel = StepChannel(args.tp, dist.new_group(backend="gloo", timeout=timedelta(hours=1)))
    engine_cfg = EngineConfig(num_pages=args.pages, max_num_seqs=args.batch, max_model_len=256,
                              max_num_batched_tokens=args.batch * 16)
    pool = PoolConfig.for_model(cfg, args.tp, engine_cfg.num_pages, engine_cfg.block_size)
    worker = TPWorker(cfg, str(Path(root) / "model"), comm, pool, LocalShardSource(adapters, cfg, args.tp), channel)
    if rank > 0:
        worker.serve_forever()
        return
    engine = Engine(worker, load_tokenizer(Path(root) / "model"), engine_cfg)
    rows = []
    for label, mode, n in scenarios(args):
        rows.append({"scenario": label, "mode": mode, "adapters": n,
                     "tokens_per_s": decode_rate(engine, args, mode, n, label)})
    engine.stop()  # tells rank 1 to stop
    Path(result).write_text(json.dumps(rows))


def decode_rate(engine: Engine, args: argparse.Namespace, mode: str, n: int, label: str) -> float:
    names = [None] * args.batch if n == 0 else [f"{mode}{i % n}" for i in range(args.batch)]
    g = torch.Generator().manual_seed(0)
    outs: dict[str, list] = {}
    for i, name in enumerate(names):
        rid = f"{label}-{i}"
        outs[rid] = []
        prompt = tuple(torch.randint(3, 1000, (8,), generator=g).tolist())
        params = SamplingParams(max_tokens=args.steps + 4, temperature=0.0, ignore_eos=True)
        engine.submit(GenerationRequest(rid, prompt, name, params), outs[rid].append)
    deadline = time.monotonic() + 600
    while not all(outs.values()):  # until every sequence has its first token: prefill done
        engine.step()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: prefill did not finish")
    assert len(engine.scheduler.running) == args.batch, "every sequence must decode in each timed step"
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    dt = time.perf_counter() - t0
    while not all(o and o[-1].finished for o in outs.values()):
        engine.step()
    return args.batch * args.steps / dt


def run(args: argparse.Namespace) -> dict:
    cfg = LlamaConfig.from_name("tiny")
    with tempfile.TemporaryDirectory() as d:
        adapters = make_files(args, cfg, Path(d))
        result = os.path.join(d, "result.json")
        mp.spawn(_worker, args=(args, d, adapters, f"file://{d}/init", result), nprocs=args.tp, join=True)
        rows = json.loads(Path(result).read_text())
    by = {r["scenario"]: r["tokens_per_s"] for r in rows}
    base = by["no LoRA"]
    ratios = {f"{r['scenario']} / no LoRA": r["tokens_per_s"] / base for r in rows if r["adapters"]}
    k = min(16, args.batch)
    bd = by[f"{k} adapter{'s' * (k > 1)} (bd)"]
    ratios[f"bd / slora ({k} adapters)"] = bd / by[f"{k} adapters slora"]
    ratios[f"bd / replicated ({k} adapters)"] = bd / by[f"{k} adapters replicated"]
    return {"config": {"model": cfg.name, "tp": args.tp, "batch": args.batch, "steps": args.steps,
                       "rank": args.rank, "device": "cpu", "kernels": "torch backend"},
            "rows": rows, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--pages", type=int, default=2048)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    out = run(args)
    print(f"{'scenario':<28} {'decode tok/s':>12}")
    for r in out["rows"]:
        print(f"{r['scenario']:<28} {r['tokens_per_s']:>12.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")
    for k, v in out["ratios"].items():
        print(f"{k:<34} {v:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
