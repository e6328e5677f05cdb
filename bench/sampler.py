"""Benchmark the batched sampler (bdlora_ray.sampling) and check it on the device against CPU.

What each per-request parameter costs a step, as a ratio to a batch of plain rows (greedy and
temperature-only sampling) at the same size: top-p, penalties + logit_bias, logprobs, grammars
(xgrammar bitmasks, if installed); and the batched sampler against the per-row loop it replaced
(`per_row`, kept here as the comparison), for plain and top-p rows. And on CUDA: the processed logits and log-probabilities equal
the CPU's, and seeded rows draw the same tokens again. Prints a table and writes JSON.

    python -m bench sampler                       # CUDA if present: B = 64, 256; vocab 128256
    python -m bench sampler --device cpu --tiny   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: its folder would shadow the `kernels` package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from bdlora_ray.request import SamplingParams, StructuredOutput
from bdlora_ray.sampling import make_generator, process_logits, sample

SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}}'
KINDS = {  # name -> parameters of every row (half of them greedy, half sampled at T = 0.8)
    "plain": {},
    "top_p": {"top_p": 0.9, "top_k": 50},
    "penalties+bias": {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5,
                       "logit_bias": ((5, 2.0), (7, -3.0))},
    "logprobs=5": {"logprobs": 5},
    "seeded": {"seed": 1},
    "grammar": {"guide": StructuredOutput("json_schema", SCHEMA)},
}


def per_row(logits, params: list[SamplingParams]) -> list[int]:
    """The sampler before batching: greedy rows by one argmax, then a Python loop over the others."""
    out = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            continue
        x = logits[i] / p.temperature
        if 0 < p.top_k < x.numel():
            x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
        if p.top_p < 1.0:
            probs, order = torch.sort(x.softmax(-1), descending=True)
            drop = probs.cumsum(-1) - probs >= p.top_p
            x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        out[i] = int(torch.multinomial(x.softmax(-1), 1))
    return out


def rows(kind: str, b: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0 if i % 2 else 0.8, max_tokens=64, **KINDS[kind]) for i in range(b)]


def inputs(kind: str, b: int, vocab: int, compiler) -> tuple[list, list, list | None]:
    params = rows(kind, b)
    g = torch.Generator().manual_seed(0)
    histories = [(torch.randint(0, vocab, (200,), generator=g).tolist(), 150) for _ in range(b)]
    guides = None
    if kind == "grammar":
        grammar = compiler.compile(params[0].guide)
        guides = [compiler.matcher(grammar) for _ in range(b)]
    return params, histories, guides


def time_step(logits, kind: str, compiler, iters: int, before: bool = False) -> float:
    b, vocab = logits.shape
    params, histories, _ = inputs(kind, b, vocab, compiler)
    gens = [make_generator(p) for p in params]
    times = []
    for i in range(iters + 2):
        guides = inputs(kind, b, vocab, compiler)[2]  # fresh matchers: each accepts one token per step
        if logits.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        if before:
            per_row(logits, params)
        else:
            sample(logits, params, gens, histories, guides, stop_ids=(2,))
        if logits.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def check_device(device: str, vocab: int, compiler) -> dict:
    """Processed logits and logprobs on `device` equal the CPU's; seeded draws repeat there."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, vocab, generator=g) * 3
    params = [SamplingParams(temperature=0.0, max_tokens=64, **KINDS[k]) for k in KINDS if k != "seeded"] * 2
    histories = [(torch.randint(0, vocab, (40,), generator=g).tolist(), 30) for _ in params]
    out = {}
    guides_cpu = [compiler.matcher(compiler.compile(p.guide)) if p.guide and compiler else None for p in params]
    guides_dev = [compiler.matcher(compiler.compile(p.guide)) if p.guide and compiler else None for p in params]
    plain = [dataclasses.replace(p, guide=None) if compiler is None else p for p in params]
    cpu = process_logits(logits, plain, histories, guides_cpu, (2,))
    dev = process_logits(logits.to(device), plain, histories, guides_dev, (2,)).cpu()
    finite = torch.isfinite(cpu)
    out["processed_equal"] = bool(torch.equal(finite, torch.isfinite(dev)) and
                                  torch.allclose(cpu[finite], dev[finite], atol=1e-5, rtol=0))
    a = sample(logits, plain, [None] * len(plain), histories).logprobs
    b = sample(logits.to(device), plain, [None] * len(plain), histories).logprobs
    out["logprobs_max_diff"] = max(abs(x.logprob - y.logprob) for x, y in zip(a, b) if x is not None)
    seeded = [SamplingParams(temperature=1.0, seed=7)] * 4
    draws = []
    for _ in range(2):
        gens = [make_generator(p) for p in seeded]
        draws.append([sample(logits[:4].to(device), seeded, gens).tokens for _ in range(5)])
    out["seeded_repeat"] = draws[0] == draws[1]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/out/sampler.json"))
    args = ap.parse_args(argv)
    vocab, batches, iters = (1024, (8,), 3) if args.tiny else (128256, (64, 256), 20)
    try:
        from bdlora_ray.guided import GrammarCompiler
        from bdlora_ray.tokenizer import make_byte_tokenizer
        import xgrammar  # noqa: F401
        compiler = GrammarCompiler(make_byte_tokenizer(), vocab, (2,))
    except ImportError:
        compiler = None
    kinds = [k for k in KINDS if k != "grammar" or compiler is not None]
    report = {"device": args.device, "vocab": vocab, "rows": []}
    if args.device != "cpu":
        report["device_check"] = check_device(args.device, vocab, compiler)
        print("device check:", report["device_check"])
    print(f"{'batch':>6} {'kind':>16} {'ms/step':>9} {'x plain':>8}")
    for b in batches:
        logits = torch.randn(b, vocab, generator=torch.Generator().manual_seed(b)).to(args.device)
        base = None
        for kind in kinds:
            ms = time_step(logits, kind, compiler, iters) * 1e3
            base = base or ms
            report["rows"].append({"batch": b, "kind": kind, "ms": ms, "ratio": ms / base})
            print(f"{b:>6} {kind:>16} {ms:>9.3f} {ms / base:>8.2f}")
        for kind in ("plain", "top_p"):
            ms = time_step(logits, kind, compiler, iters, before=True) * 1e3
            after = next(r["ms"] for r in report["rows"] if r["batch"] == b and r["kind"] == kind)
            report["rows"].append({"batch": b, "kind": f"{kind} per_row", "ms": ms, "ratio": ms / base,
                                   "per_row_over_batched": ms / after})
            print(f"{b:>6} {kind + ' per_row':>16} {ms:>9.3f} {ms / base:>8.2f}   per-row / batched {ms / after:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
