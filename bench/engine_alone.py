"""The engine's decode speed without any serving layer, for the serving comparisons to divide by.

As bench/decode.py: TP plain processes over gloo, rank 0 steps the engine by hand (no thread, no Ray,
no HTTP), rank > 0 follows. Each case is a batch given as one adapter name (or None) per sequence;
its rate is decode tokens/s over `steps` steps in which every sequence decodes (prefill and adapter
loads excluded), the fastest of `windows` windows of `steps` steps back to back, as bench/decode.py
takes each round's rate: on a shared machine a window that another process slowed would otherwise
flatter every ratio to it. Run it before a comparison's server starts, so that nothing else competes
for CPU.
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
        eng = Engine(worker, load_tokenizer(model_dir), ecfg)
        rates = {label: decode_rate(eng, names, steps, windows) for label, names in cases.items()}
        eng.stop()  # tells the other ranks to stop
        Path(result).write_text(json.dumps(rates))
    leave_world(barrier=True)
    end_spawned_rank()


def decode_rate(engine: Any, names: list, steps: int, windows: int = 1) -> float:
    from bdlora_ray.request import GenerationRequest, SamplingParams

    outs: dict[str, list] = {}
    for i, name in enumerate(names):
        rid = f"{i}-{name}-{time.monotonic_ns()}"
        outs[rid] = []
        params = SamplingParams(max_tokens=steps * windows + 4, temperature=0.0, ignore_eos=True)
        engine.submit(GenerationRequest(rid, PROMPT, name, params), outs[rid].append)
    deadline = time.monotonic() + 600
    while not all(outs.values()):  # prefill (and adapter loads) first
        if not engine.step():
            engine.wait_for_work(0.05)
        if time.monotonic() > deadline:
            raise TimeoutError("prefill did not finish")
    if len(engine.scheduler.running) != len(names):
        raise RuntimeError("every sequence must decode in each timed step: raise num_pages or max_num_seqs")
    best = float("inf")
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        best = min(best, time.perf_counter() - t0)
    while not all(o and o[-1].finished for o in outs.values()):
        engine.step()
    return len(names) * steps / best


def measure(model_dir: Path, adapters: dict[str, tuple[str, str]], cases: dict[str, list], tp: int,
            steps: int, engine: dict[str, Any], windows: int = 3) -> dict[str, float]:
    """{case label: decode tokens/s, the fastest of `windows` windows of `steps` steps}. adapters: name ->
    (PEFT directory, mode); engine: EngineConfig fields."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as d:
        result = os.path.join(d, "result.json")
        mp.spawn(_worker, args=(tp, str(model_dir), adapters, cases, steps, windows, engine, f"file://{d}/init", result),
                 nprocs=tp, join=True)
        return json.loads(Path(result).read_text())
