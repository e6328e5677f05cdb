"""Chunked prefill and prefix caching, the engine alone at TP=1 (no HTTP, stepped by hand), both
comparisons in one run, off and on alternating round by round:

1. TPOT of decoding requests while long prompts arrive: `--decoders` requests decode throughout;
   a `--long`-token prompt arrives every `--every` steps. Off: chunked prefill off, a step budget
   that holds a whole prompt (each arrival's prefill is one long step for every decode). On:
   chunked prefill with a `--budget`-token step budget shared by the decodes and the prompt's pieces.
2. TTFT with a shared `--system`-token system prompt and a `--suffix`-token question of its own,
   requests one after the other, prefix caching off and on.

    python -m bench prefill [--rounds 3] [--json PATH]
    python -m bench prefill --model llama-3.1-8b --device cuda --long 4096 --budget 512   # random bf16 weights

Prints a table and the two ratios last, and writes JSON (default bench/out/prefill.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_JSON = Path(__file__).parent / "out" / "prefill.json"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def make_worker(model: Path | str, device: str, num_pages: int, block_size: int = 16):
    """One TP=1 worker (model and pool) on a checkpoint directory (float32), or on random bfloat16
    weights of a preset name; every engine of the run is built around it."""
    import torch

    from bdlora_ray.comm import Comm
    from bdlora_ray.config import LlamaConfig
    from bdlora_ray.memory import PoolConfig
    from bdlora_ray.tokenizer import load_tokenizer
    from bdlora_ray.tp import RandomWeights
    from bdlora_ray.worker import LocalShardSource, StepChannel, TPWorker

    if isinstance(model, Path):
        cfg, dtype, weights, tokenizer = LlamaConfig.from_json(model), torch.float32, str(model), load_tokenizer(model)
    else:
        from bench.gpu import SilentTokenizer

        cfg, dtype, tokenizer = LlamaConfig.from_name(model), torch.bfloat16, SilentTokenizer()
        weights = RandomWeights(cfg, device, dtype)
    pool = PoolConfig.for_model(cfg, 1, num_pages, block_size, dtype, device)
    return TPWorker(cfg, weights, Comm(), pool, LocalShardSource({}, cfg, 1), StepChannel(1), device, dtype), tokenizer


def make_engine(worker, tokenizer, **overrides: Any):
    """An engine with these settings around `worker` (whose pool the previous engines left empty of KV;
    cached blocks of an earlier prefix-caching run never match: every round draws its own prompts)."""
    from bdlora_ray.engine import Engine, EngineConfig

    config = EngineConfig(num_pages=worker.pool.config.num_pages, block_size=worker.pool.config.block_size,
                          **overrides)
    return Engine(worker, tokenizer, config)


def _request(rid: str, prompt: list[int], max_tokens: int):
    from bdlora_ray.request import GenerationRequest, SamplingParams

    return GenerationRequest(rid, tuple(prompt), None, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                      ignore_eos=True))


def tpot_under_long_prompts(engine, args: argparse.Namespace, seed: int) -> dict:
    """Inter-token gaps of the decoding requests (after their first token) while long prompts arrive."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    vocab = engine.worker.cfg.vocab_size
    stamps: dict[str, list[float]] = {}
    firsts: dict[str, float] = {}
    submitted: dict[str, float] = {}

    def sink_for(rid: str):
        def sink(out) -> None:
            if out.token_ids:
                stamps.setdefault(rid, []).append(time.perf_counter())
        return sink

    decoders = [f"d{i}" for i in range(args.decoders)]
    steps = args.arrivals * args.every + 2 * args.long // args.budget + 8
    for rid in decoders:
        engine.submit(_request(rid, torch.randint(3, vocab, (8,), generator=g).tolist(), steps + 4), sink_for(rid))
    while not all(rid in stamps for rid in decoders):
        engine.step()
    arrived, step = 0, 0
    t0 = time.perf_counter()
    while step < steps:
        if arrived < args.arrivals and step % args.every == 0:
            rid = f"long{arrived}"
            submitted[rid] = time.perf_counter()
            engine.submit(_request(rid, torch.randint(3, vocab, (args.long,), generator=g).tolist(), 1), sink_for(rid))
            arrived += 1
        engine.step()
        step += 1
    wall = time.perf_counter() - t0
    for rid in submitted:
        while rid not in stamps:
            engine.step()
        firsts[rid] = stamps[rid][0] - submitted[rid]
    for rid in decoders:
        engine.abort(rid)
    engine.step()
    gaps = [b - a for rid in decoders for a, b in zip(stamps[rid], stamps[rid][1:])]
    return {"tpot_p50_ms": 1e3 * percentile(gaps, 50), "tpot_p99_ms": 1e3 * percentile(gaps, 99),
            "tpot_max_ms": 1e3 * max(gaps), "long_ttft_mean_ms": 1e3 * statistics.mean(firsts.values()),
            "decode_tokens_per_s": len(gaps) / wall, "gaps": len(gaps)}


def ttft_with_system_prompt(engine, args: argparse.Namespace, seed: int) -> dict:
    """First-token latency of requests sharing a system prompt, one after the other."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    vocab = engine.worker.cfg.vocab_size
    system = torch.randint(3, vocab, (args.system,), generator=g).tolist()
    ttfts = []
    for i in range(args.requests):
        prompt = system + torch.randint(3, vocab, (args.suffix,), generator=g).tolist()
        got: list[float] = []
        t0 = time.perf_counter()
        engine.submit(_request(f"s{seed}-{i}", prompt, 1), lambda out: got.append(time.perf_counter()))
        while not got:
            engine.step()
        ttfts.append(got[0] - t0)
    warm = ttfts[1:]  # the first request of either run computes the system prompt
    return {"ttft_first_ms": 1e3 * ttfts[0], "ttft_p50_ms": 1e3 * statistics.median(warm),
            "ttft_mean_ms": 1e3 * statistics.mean(warm),
            "hit_tokens": engine.counters["prefix_cache_hits"], "query_tokens": engine.counters["prefix_cache_queries"]}


def run(args: argparse.Namespace) -> dict:
    import torch

    from bdlora_ray.config import LlamaConfig
    from deploy.seed import write_checkpoint

    torch.set_num_threads(args.threads)
    model = args.model or args.model_dir or write_checkpoint(Path(tempfile.gettempdir()) / "bdlora-bench-tiny",
                                                             LlamaConfig.from_name("tiny"))
    worker, tokenizer = make_worker(model, args.device, args.pages)
    common = dict(max_model_len=args.long + args.system + 64, max_num_seqs=64)
    chunk_modes = {"off": dict(enable_chunked_prefill=False, max_num_batched_tokens=args.long + args.decoders),
                   "on": dict(enable_chunked_prefill=True, max_num_batched_tokens=args.budget)}
    cache_modes = {"off": dict(enable_prefix_caching=False), "on": dict(enable_prefix_caching=True)}
    rounds: dict[str, dict[str, list[dict]]] = {"chunked_prefill": {"off": [], "on": []},
                                               "prefix_caching": {"off": [], "on": []}}
    for r in range(-1 if args.warmup else 0, args.rounds):  # round -1 warms up (first calls of each shape)
        for mode in ("off", "on"):  # alternating: a slow spell of a shared machine hits both sides
            engine = make_engine(worker, tokenizer, enable_prefix_caching=False, **chunk_modes[mode], **common)
            tpot = tpot_under_long_prompts(engine, args, seed=r)
            engine.stop()
            engine = make_engine(worker, tokenizer, **cache_modes[mode], **common)
            ttft = ttft_with_system_prompt(engine, args, seed=r)
            engine.stop()
            if r >= 0:
                rounds["chunked_prefill"][mode].append(tpot)
                rounds["prefix_caching"][mode].append(ttft)
    # Per mode, the median over rounds of each figure.
    summary = {k: {mode: {f: statistics.median(x[f] for x in runs) for f in runs[0]} for mode, runs in v.items()}
               for k, v in rounds.items()}
    cp, pc = summary["chunked_prefill"], summary["prefix_caching"]
    res = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "model_dir")},
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "chunked_prefill": cp, "prefix_caching": pc, "rounds": rounds,
           "tpot_p99_ratio_on_over_off": cp["on"]["tpot_p99_ms"] / cp["off"]["tpot_p99_ms"],
           "ttft_ratio_on_over_off": pc["on"]["ttft_p50_ms"] / pc["off"]["ttft_p50_ms"]}
    return res


def report(res: dict) -> str:
    cp, pc, c = res["chunked_prefill"], res["prefix_caching"], res["config"]
    lines = [f"{c['model'] or 'tiny'} on {res['device']}",
             f"TPOT of {c['decoders']} decoding requests, a {c['long']}-token prompt every {c['every']} steps "
             f"(median of {c['rounds']} rounds)",
             f"{'chunked prefill':<16}{'TPOT p50 ms':>12}{'p99 ms':>9}{'max ms':>9}{'long TTFT ms':>14}{'decode tok/s':>14}"]
    for mode in ("off", "on"):
        m = cp[mode]
        lines.append(f"{mode:<16}{m['tpot_p50_ms']:>12.1f}{m['tpot_p99_ms']:>9.1f}{m['tpot_max_ms']:>9.1f}"
                     f"{m['long_ttft_mean_ms']:>14.1f}{m['decode_tokens_per_s']:>14.1f}")
    lines += ["", f"TTFT with a shared {c['system']}-token system prompt + {c['suffix']} tokens, "
                  f"{c['requests']} requests in turn",
              f"{'prefix caching':<16}{'first ms':>10}{'p50 ms':>9}{'mean ms':>9}{'hit tokens':>12}"]
    for mode in ("off", "on"):
        m = pc[mode]
        lines.append(f"{mode:<16}{m['ttft_first_ms']:>10.1f}{m['ttft_p50_ms']:>9.1f}{m['ttft_mean_ms']:>9.1f}"
                     f"{m['hit_tokens']:>12.0f}")
    lines += ["", f"ratio TPOT p99 chunked on/off: {res['tpot_p99_ratio_on_over_off']:.2f}x",
              f"ratio TTFT p50 prefix caching on/off: {res['ttft_ratio_on_over_off']:.2f}x"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None, help="HF checkpoint (default: the tiny random model)")
    p.add_argument("--model", default=None, help="a preset name instead: random bfloat16 weights of its shape")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--decoders", type=int, default=8, help="requests decoding throughout")
    p.add_argument("--long", type=int, default=1024, help="tokens of each arriving long prompt")
    p.add_argument("--every", type=int, default=12, help="steps between long-prompt arrivals")
    p.add_argument("--arrivals", type=int, default=6, help="long prompts in all")
    p.add_argument("--budget", type=int, default=128, help="step token budget with chunked prefill on")
    p.add_argument("--system", type=int, default=512, help="tokens of the shared system prompt")
    p.add_argument("--suffix", type=int, default=16, help="tokens of each request's own part")
    p.add_argument("--requests", type=int, default=9, help="requests sharing the system prompt")
    p.add_argument("--pages", type=int, default=1024, help="pool pages (16 tokens each)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--rounds", type=int, default=3, help="off/on rounds; each figure is their median")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the discarded first round")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the result")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    res = run(args)
    print(report(res))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
