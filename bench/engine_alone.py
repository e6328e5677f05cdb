"""The engine's decode speed without any serving layer, for the serving comparisons to divide by.

As bench/decode.py: TP plain processes over gloo, rank 0 steps the engine by hand (no thread, no Ray,
no HTTP), rank > 0 follows. Each case is a batch given as one adapter name (or None) per sequence;
its rate is decode tokens/s over `steps` steps in which every sequence decodes (prefill and adapter
loads excluded), timed in `windows` windows of `steps` steps by the same function as bench/decode.py's
rounds (`bench.decode.decode_windows`), each window on a batch of its own, prefilled just before it: each
window then decodes at the same context positions (the prompt's 8 tokens and 1 to `steps` more) as a
request of `steps` tokens does, where windows back to back on one batch would run at ever longer
contexts (the attention's share of a step grows with them). Each case first runs one such window untimed
(the first forward passes of a process, or of a batch shape, run slower), as a served comparison runs
an untimed wave first. `measure` keeps each case's fastest window, as
bench/decode.py takes each round's rate (engine against engine, the same estimator on both sides of a
ratio); `measure_windows` returns every window's rate, for a comparison that holds the engine to another
kind of measurement to take the same estimator as that one. Run it before a comparison's server starts,
so that nothing else competes for CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

PROMPT = (5, 6, 7, 8, 9, 10, 11, 12)


def _worker(rank: int, tp: int, model_dir: str, adapters: dict, cases: dict, steps: int, windows: int,
            engine: dict, init: str, result: str) -> None:
    import torch.distributed as dist

    from bdlora_ray.comm import end_spawned_rank, init_distributed, leave_world
    from bdlora_ray.config import LlamaConfig
    from bdlora_ray.engine import Engine, EngineConfig
    from bdlora_ray.memory import PoolConfig
    from bdlora_ray.tokenizer import load_tokenizer
    from bdlora_ray.worker import LocalShardSource, StepChannel, TPWorker

    torch.set_num_threads(1)  # as a served TP worker with a CPU bundle below one core
    cfg = LlamaConfig.from_json(model_dir)
    comm = init_distributed(rank, tp, init)
    channel = StepChannel(tp, dist.new_group(backend="gloo", timeout=timedelta(hours=1)))
    ecfg = EngineConfig(**engine)
    pool = PoolConfig.for_model(cfg, tp, ecfg.num_pages, ecfg.block_size)
    worker = TPWorker(cfg, model_dir, comm, pool, LocalShardSource(adapters, cfg, tp), channel)
    if rank > 0:
        worker.serve_forever()
    else:
        from bench.decode import decode_windows

        eng = Engine(worker, load_tokenizer(model_dir), ecfg)
        rates = {}
        for label, names in cases.items():
            rates[label] = []
            for w in range(windows + 1):  # a fresh batch each: every window spans the same context positions
                (timed,) = decode_windows(eng, names, steps, 1, f"{label}-{w}-{time.monotonic_ns()}", prompt=PROMPT)
                if w > 0:  # the first is untimed: it warms the batch's code paths (the first case's: the process)
                    rates[label].append(len(names) * steps / timed.wall_s)
        eng.stop()  # tells the other ranks to stop
        Path(result).write_text(json.dumps(rates))
    leave_world(barrier=True)
    end_spawned_rank()


def measure(model_dir: Path, adapters: dict[str, tuple[str, str]], cases: dict[str, list], tp: int,
            steps: int, engine: dict[str, Any], windows: int = 3) -> dict[str, float]:
    """{case label: decode tokens/s, the fastest of `windows` windows of `steps` steps}. adapters: name ->
    (PEFT directory, mode); engine: EngineConfig fields."""
    return {k: max(v) for k, v in measure_windows(model_dir, adapters, cases, tp, steps, engine, windows).items()}


def measure_windows(model_dir: Path, adapters: dict[str, tuple[str, str]], cases: dict[str, list], tp: int,
                    steps: int, engine: dict[str, Any], windows: int = 3) -> dict[str, list[float]]:
    """{case label: decode tokens/s of each of its `windows` windows of `steps` steps, in order}; as
    `measure`."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as d:
        result = os.path.join(d, "result.json")
        mp.spawn(_worker, args=(tp, str(model_dir), adapters, cases, steps, windows, engine, f"file://{d}/init", result),
                 nprocs=tp, join=True)
        return json.loads(Path(result).read_text())
