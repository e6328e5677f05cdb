"""Decode throughput of a TP replica group as the number of distinct adapters grows, as ratios.

Two plain processes (gloo) run the engine exactly as a replica group does:
rank 0 schedules and broadcasts each step, rank 1 follows. Scenarios, all at
batch B (every sequence decoding in each timed step):

- the acceptance pair: no LoRA, and 1 or B distinct BD-LoRA adapters of rank --rank;
- the sweep: in each mode (bd, slora, replicated), 1, 4, 16, 64 and 256 distinct
  adapters of mixed ranks 8, 16, 32, 64 (adapter i has rank (8, 16, 32, 64)[i % 4]);
  above B, all of them are made resident first and the batch's B rows use
  B of them spread over the set (the step's cost must not follow residency).

Each row prints its decode rate as a ratio to no LoRA and to 1 adapter of its
sweep, beside the FLOP bound: base MACs / (base + LoRA MACs) per token on one
rank, the LoRA MACs being each row's adapter factors' elements (each is used
once per token). Adapter loads and prefill are not timed.

Measurement, made for a shared, noisy machine: --rounds rounds, each running
every scenario once, back to back (interleaved: ABC.. then ..CBA, the order
reversed every other round so that a slow drift hits both sides of a ratio
alike). In a round a scenario's rate is its fastest of --windows windows of
--steps decode steps. Each ratio is the median over rounds of the ratio of
the two rates measured in the same round; a row's tok/s is the median of its
rounds' rates (what the JSON's `rounds` lists).

Each rate is taken twice: by the wall clock, and by CPU time, the window's
process CPU time on its busiest rank (rank 0: the whole engine step; other
ranks: their forward passes), as `cpu_rounds`. On a machine shared with other
work the wall clock of a window counts the time other processes held the
cores; the CPU time counts only this rank's own work, which is what the
ranks' step costs when each has a core to itself. Both are reported.

    python -m bench decode [--tp 2] [--batch 64] [--steps 8] [--windows 2] [--rounds 5] [--rank 16] [--counts 1,4,16,64,256]

On this CPU the LoRA part runs the torch kernel backend; the ratios, not the
absolute numbers, are the result. Prints a table, the acceptance ratios last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from bdlora_ray.comm import end_spawned_rank, init_distributed, leave_world
from bdlora_ray.config import LlamaConfig
from bdlora_ray.engine import Engine, EngineConfig
from bdlora_ray.lora.layout import TARGETS
from bdlora_ray.memory import PoolConfig
from bdlora_ray.request import GenerationRequest, SamplingParams
from bdlora_ray.synthetic import random_adapter, write_peft_adapter, write_random_checkpoint
from bdlora_ray.tokenizer import load_tokenizer
from bdlora_ray.worker import LocalShardSource, StepChannel, TPWorker
from bench.runner import median_ratio

DEFAULT_JSON = Path(__file__).parent / "out" / "decode.json"
MODES = ("bd", "slora", "replicated")
MIXED_RANKS = (8, 16, 32, 64)


def scenarios(args: argparse.Namespace) -> list[dict]:
    """label, sweep (what '1 adapter' it is compared with), adapter names of the set, rows' adapters."""
    out = [{"scenario": "no LoRA", "sweep": "base", "mode": None, "adapters": 0, "names": []}]
    for n in sorted({1, args.batch}):  # the acceptance pair, one rank
        out.append({"scenario": f"{n} x r{args.rank} (bd)", "sweep": f"r{args.rank}", "mode": "bd", "adapters": n,
                    "names": [f"bd-r{args.rank}-{i}" for i in range(n)]})
    for mode in MODES:
        for n in args.counts:
            out.append({"scenario": f"{n} mixed ({mode})", "sweep": f"mixed {mode}", "mode": mode, "adapters": n,
                        "names": [f"{mode}-mix-{i}" for i in range(n)]})
    return out


def adapter_files(args: argparse.Namespace, cfg: LlamaConfig, root: Path) -> dict[str, tuple[str, str]]:
    """PEFT files for every name the scenarios use: BD-LoRA (nblocks = TP) for bd, ordinary
    LoRA for slora and replicated (one file serves both modes)."""
    adapters = {}
    n_max = max(args.counts + [args.batch])
    for i in range(args.batch):
        path = write_peft_adapter(random_adapter(cfg, args.rank, nblocks=args.tp, seed=i), root / f"bd-r{args.rank}-{i}")
        adapters[f"bd-r{args.rank}-{i}"] = (str(path), "bd")
    for i in range(n_max):
        rank = MIXED_RANKS[i % len(MIXED_RANKS)]
        bd = write_peft_adapter(random_adapter(cfg, rank, nblocks=args.tp, seed=1000 + i), root / f"bd-mix-{i}")
        lora = write_peft_adapter(random_adapter(cfg, rank, seed=2000 + i), root / f"lora-mix-{i}")
        adapters[f"bd-mix-{i}"] = (str(bd), "bd")
        adapters[f"slora-mix-{i}"] = (str(lora), "slora")
        adapters[f"replicated-mix-{i}"] = (str(lora), "replicated")
    return adapters


class AdapterCost:
    """Rank and LoRA multiply-adds per token per layer on rank 0 of each adapter (every factor
    element is used once per token); read from its shard once."""

    def __init__(self, source: LocalShardSource) -> None:
        self.source = source
        self._known: dict[str, tuple[int, int]] = {}  # name -> (rank, MACs)

    def __call__(self, name: str) -> tuple[int, int]:
        if name not in self._known:
            meta, tensors = self.source.get_shard(name, 0)[:2]
            self._known[name] = meta.rank, sum(t.numel() for k, t in tensors.items() if k.startswith("layers.0."))
        return self._known[name]


def base_macs(cfg: LlamaConfig, tp: int) -> tuple[int, int]:
    """(per layer, LM head) multiply-adds per token on one rank: its slices of the weights."""
    per_layer = sum(cfg.in_features(t) * cfg.out_features(t) for t in TARGETS) // tp
    return per_layer, cfg.vocab_size * cfg.hidden_size // tp


def _worker(rank: int, args: argparse.Namespace, root: str, adapters: dict, init: str, result: str) -> None:
    torch.set_num_threads(1)
    cfg = LlamaConfig.from_json(Path(root) / "model", name="tiny")
    comm = init_distributed(rank, args.tp, init)
    channel = StepChannel(args.tp, dist.new_group(backend="gloo", timeout=timedelta(hours=1)))
    engine_cfg = EngineConfig(num_pages=args.pages, max_num_seqs=args.batch, max_model_len=256,
                              max_num_batched_tokens=args.batch * 16)
    pool = PoolConfig.for_model(cfg, args.tp, engine_cfg.num_pages, engine_cfg.block_size)
    source = LocalShardSource(adapters, cfg, args.tp)
    worker = TPWorker(cfg, str(Path(root) / "model"), comm, pool, source, channel)
    step_cpu = time_steps(worker)
    if rank > 0:
        worker.serve_forever()
        Path(f"{result}.rank{rank}").write_text(json.dumps(step_cpu))  # read by rank 0 after the barrier
        leave_world(barrier=True)
        end_spawned_rank()
    engine = Engine(worker, load_tokenizer(Path(root) / "model"), engine_cfg)
    per_layer, head = base_macs(cfg, args.tp)
    cost = AdapterCost(source)
    windows: dict[str, list[list[Window]]] = {sc["scenario"]: [] for sc in scenarios(args)}
    for round_ in range(args.rounds):
        order = scenarios(args) if round_ % 2 == 0 else scenarios(args)[::-1]
        for sc in order:
            if len(sc["names"]) > args.batch:
                make_resident(engine, args, sc["names"])
            timed = decode_windows(engine, spread(sc["names"], args.batch), args.steps, args.windows,
                                   f"{sc['scenario']} #{round_}")
            windows[sc["scenario"]].append(timed)
            rate = args.batch * args.steps / min(w.wall_s for w in timed)
            print(f"{sc['scenario']:<24} {rate:10.1f} tok/s", file=sys.stderr, flush=True)
    engine.stop()  # tells rank 1 to stop
    leave_world(barrier=True)
    others = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(1, args.tp)]
    rows = []
    for sc in scenarios(args):
        batch_names = spread(sc["names"], args.batch)
        lora = sum(cost(n)[1] for n in batch_names if n is not None) / args.batch
        base = cfg.num_layers * per_layer + head
        wall = [args.batch * args.steps / min(w.wall_s for w in ws) for ws in windows[sc["scenario"]]]
        cpu = [args.batch * args.steps / min(w.cpu_s(others) for w in ws) for ws in windows[sc["scenario"]]]
        rows.append({**{k: v for k, v in sc.items() if k != "names"},
                     "rounds": wall, "tokens_per_s": statistics.median(wall),
                     "cpu_rounds": cpu, "cpu_tokens_per_s": statistics.median(cpu),
                     "ranks": sorted({cost(n)[0] for n in set(batch_names) if n is not None}),
                     "flop_bound": base / (base + cfg.num_layers * lora)})
    Path(result).write_text(json.dumps(rows))
    end_spawned_rank()


def time_steps(worker: TPWorker) -> list[float]:
    """Record the CPU time of each step this rank runs (`TPWorker.execute`), in step order."""
    log: list[float] = []
    execute = worker.execute

    def timed(seqs: list[list]) -> Tensor:
        t0 = time.process_time()
        out = execute(seqs)
        log.append(time.process_time() - t0)
        return out

    worker.execute = timed
    return log


@dataclass(frozen=True)
class Window:
    """One timed window of decode steps on rank 0."""

    wall_s: float  # wall-clock time
    cpu_s0: float  # rank 0's CPU time (the whole engine step: scheduling, the forward, sampling)
    steps: tuple[int, int]  # the steps' indices (every rank runs the same steps in the same order)

    def cpu_s(self, others: list[list[float]]) -> float:
        """The window's CPU time on its busiest rank (`others`: the other ranks' per-step CPU times)."""
        return max([self.cpu_s0] + [sum(log[self.steps[0]:self.steps[1]]) for log in others])


def spread(names: list[str], batch: int) -> list[str | None]:
    """Each row's adapter: round robin over the set, or, when the set is larger than the batch,
    `batch` distinct ones spread over it (stride n/B plus one, so the ranks still cycle);
    None for the base model."""
    if not names:
        return [None] * batch
    n = len(names)
    if n <= batch:
        return [names[i % n] for i in range(batch)]
    picked = [names[(i * n // batch + i) % n] for i in range(batch)]
    if len(set(picked)) != batch:
        raise ValueError(f"cannot spread {batch} distinct rows over {n} adapters")
    return picked


def make_resident(engine: Engine, args: argparse.Namespace, names: list[str]) -> None:
    """Load every adapter of the set into the pool (one short request each, B at a time)."""
    for start in range(0, len(names), args.batch):
        chunk = names[start:start + args.batch]
        outs: dict[str, list] = {}
        for i, name in enumerate(chunk):
            outs[name] = []
            params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            engine.submit(GenerationRequest(f"warm-{name}", (5, 6, 7), name, params), outs[name].append)
        run_until(engine, lambda: all(o and o[-1].finished for o in outs.values()), "warm-up")


def run_until(engine: Engine, done, what: str, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if not engine.step():
            engine.wait_for_work(0.05)  # an adapter fetch in the background
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not finish in {timeout_s} s")


def decode_windows(engine: Engine, names: list[str | None], steps: int, windows: int, label: str,
                   prompt: tuple[int, ...] | None = None) -> list[Window]:
    """Prefill one sequence per entry of `names` (its adapter; prompts of 8 seeded random tokens, or
    `prompt` for every one), then time `windows` windows of `steps` decode steps, in each of which
    every sequence decodes; `label` names the requests (unique per call). Adapter loads and prefill
    are not timed. Also what `bench.engine_alone` times."""
    g = torch.Generator().manual_seed(0)
    outs: dict[str, list] = {}
    for i, name in enumerate(names):
        rid = f"{label}-{i}"
        outs[rid] = []
        tokens = prompt or tuple(torch.randint(3, 1000, (8,), generator=g).tolist())
        params = SamplingParams(max_tokens=steps * windows + 4, temperature=0.0, ignore_eos=True)
        engine.submit(GenerationRequest(rid, tokens, name, params), outs[rid].append)
    run_until(engine, lambda: all(outs.values()), f"{label}: prefill")  # every sequence has its first token
    if len(engine.scheduler.running) != len(names):
        raise RuntimeError(f"{label}: {len(engine.scheduler.running)} of {len(names)} sequences running; every "
                           "sequence must decode in each timed step: raise num_pages or max_num_seqs")
    timed = []
    for _ in range(windows):
        first = engine.worker.steps
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            engine.step()
        timed.append(Window(time.perf_counter() - t0, time.process_time() - c0, (first, engine.worker.steps)))
    run_until(engine, lambda: all(o and o[-1].finished for o in outs.values()), f"{label}: drain")
    return timed


def per_round_ratio(row: dict, ref: dict, key: str = "rounds") -> float:
    """Median over rounds of row's rate / ref's rate in the same round (noise of one round hits both)."""
    return median_ratio(row[key], ref[key])


def ratios(rows: list[dict]) -> list[dict]:
    """Each row's rates (wall clock and CPU time) as ratios to no LoRA and to 1 adapter of its
    sweep, beside the bounds."""
    base = next(r for r in rows if r["adapters"] == 0)
    ones = {r["sweep"]: r for r in rows if r["adapters"] == 1}
    for r in rows:
        one = ones.get(r["sweep"], base)
        r["vs_no_lora"] = per_round_ratio(r, base)
        r["vs_1_adapter"] = per_round_ratio(r, one)
        r["cpu_vs_no_lora"] = per_round_ratio(r, base, "cpu_rounds")
        r["cpu_vs_1_adapter"] = per_round_ratio(r, one, "cpu_rounds")
        r["bound_vs_1_adapter"] = r["flop_bound"] / one["flop_bound"]
    return rows


def run(args: argparse.Namespace) -> dict:
    cfg = LlamaConfig.from_name("tiny")
    with tempfile.TemporaryDirectory() as d:
        write_random_checkpoint(cfg, Path(d) / "model", seed=0)
        adapters = adapter_files(args, cfg, Path(d))
        result = os.path.join(d, "result.json")
        mp.spawn(_worker, args=(args, d, adapters, f"file://{d}/init", result), nprocs=args.tp, join=True)
        rows = ratios(json.loads(Path(result).read_text()))
    by = {r["scenario"]: r for r in rows}
    one, many = by[f"1 x r{args.rank} (bd)"], by[f"{args.batch} x r{args.rank} (bd)"]
    acceptance = {f"1 adapter / no LoRA (r{args.rank}, bd)": one["vs_no_lora"],
                  f"{args.batch} adapters / 1 adapter (r{args.rank}, bd)": many["vs_1_adapter"],
                  f"1 adapter / no LoRA (r{args.rank}, bd), CPU": one["cpu_vs_no_lora"],
                  f"{args.batch} adapters / 1 adapter (r{args.rank}, bd), CPU": many["cpu_vs_1_adapter"]}
    return {"config": {"model": cfg.name, "tp": args.tp, "batch": args.batch, "steps": args.steps, "windows": args.windows,
                       "rounds": args.rounds,
                       "rank": args.rank, "counts": args.counts, "mixed_ranks": list(MIXED_RANKS),
                       "device": "cpu", "kernels": "torch backend"},
            "rows": rows, "acceptance": acceptance}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--windows", type=int, default=2, help="timed windows of --steps steps per round; the fastest counts")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved passes over all scenarios; ratios are medians of per-round ratios")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64, 256],
                   help="distinct adapters of the mixed-rank sweep, comma separated (must include 1)")
    p.add_argument("--pages", type=int, default=16384)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    if 1 not in args.counts:
        p.error("--counts must include 1: the sweep's ratios are taken to it")
    out = run(args)
    print(f"{'scenario':<24} {'tok/s':>9} {'vs no LoRA':>10} {'bound':>6} {'vs 1 adapter':>12} {'bound':>6} "
          f"{'CPU: vs no LoRA':>15} {'vs 1 adapter':>12}")
    for r in out["rows"]:
        print(f"{r['scenario']:<24} {r['tokens_per_s']:>9.1f} {r['vs_no_lora']:>9.2f}x {r['flop_bound']:>5.2f}x "
              f"{r['vs_1_adapter']:>11.2f}x {r['bound_vs_1_adapter']:>5.2f}x "
              f"{r['cpu_vs_no_lora']:>14.2f}x {r['cpu_vs_1_adapter']:>11.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")
    for k, v in out["acceptance"].items():
        print(f"{k:<45} {v:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
