"""(c) Our server vs HF transformers + PEFT switching adapters per request, on the same workload.

The baseline is what one writes without a serving system: every adapter
loaded into one `PeftModel`, then requests served one at a time in arrival
order, `set_adapter(name)` then `generate` (greedy, exactly max_tokens
tokens), each request starting at its arrival time or when the previous one
ends. It runs in this process before our server starts, with as many
torch threads as our TP workers have cores together (`--peft-threads`), and
is timed the same way: TTFT from the scheduled arrival to the first
generated token (a streamer's timestamps), per-token latency after it.
Our server gets the identical requests over HTTP (the adapters warmed into
host memory first, as the baseline has them in memory too).

Anchor: S-LoRA reports up to ~30x the throughput of PEFT (A100, Llama-7B).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench import compare, runner
from bench.workload import Request
from deploy.seed import DemoAdapter

log = logging.getLogger(__name__)

NAME = "peft"
HELP = "(c) our server vs HF transformers + PEFT (set_adapter per request, sequential generate)"
ANCHOR = "S-LoRA: up to ~30x the throughput of HF PEFT (A100, Llama-7B)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--adapters", type=int, default=10, help="distinct adapters")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--mode", choices=("bd", "slora", "replicated"), default="bd",
                   help="how our server shards them (bd: BD-LoRA adapters, else ordinary LoRAs)")
    p.add_argument("--pages", type=int, default=4096, help="pages per layer of each rank's unified pool")
    p.add_argument("--peft-threads", type=int, default=2, help="torch threads of the PEFT baseline")
    compare.add_workload_arguments(p, requests=96, rate=24.0)


def run(args: argparse.Namespace) -> dict:
    adapters = [DemoAdapter(f"p-{k}", args.rank, args.mode == "bd", args.mode, seed=k) for k in range(args.adapters)]
    server = compare.server_config(args, num_pages=args.pages)
    reqs = compare.workload(args, args.adapters, prefix="p")
    with tempfile.TemporaryDirectory(prefix="bench-peft-") as d:
        # The baseline first, while nothing else of ours runs (a Ray cluster takes a while to wind down).
        model_dir, peft_dirs = compare.write_files(Path(d), adapters, args.tp, args.model)
        peft = run_peft(reqs, model_dir, peft_dirs, compare.slo(args), args.peft_threads, args.time_limit,
                        args.progress)
        with compare.local_server(Path(d), adapters, server, args.progress) as served:
            compare.warm_up(served, [a.name for a in adapters], args.progress)
            ours = runner.run(reqs, compare.runner_config(args, served, "bdlora-ray"))
    ratio = ours.summary["tokens_per_s"] / peft.summary["tokens_per_s"]
    return {
        "comparison": NAME, "anchor": ANCHOR,
        "config": {"tp": args.tp, "adapters": args.adapters, "rank": args.rank, "mode": args.mode,
                   "peft_threads": args.peft_threads, "requests": args.requests, "rate": args.rate, "cv": args.cv,
                   "alpha": args.alpha, "input_len": args.input_len, "output_len": args.output_len,
                   "model": compare.model_info(args), "device": "cpu"},
        "runs": [{"name": f"bdlora-ray (TP={args.tp}, {args.mode}, HTTP)", **ours.to_dict()},
                 {"name": "HF PEFT (set_adapter + generate, in process)", **peft.to_dict()}],
        "ratios": {"bdlora-ray / PEFT throughput": ratio},
    }


class _TokenTimes:
    """A transformers streamer that only records when each put() arrives (the prompt, then each token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


def run_peft(requests: list[Request], model_dir: Path, peft_dirs: dict[str, Path], slo: runner.SLO, threads: int,
             time_limit_s: float, progress: bool = True) -> runner.RunResult:
    """Serve `requests` sequentially with HF transformers + PEFT, in real time from their arrivals."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from bdlora_ray.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_dir)
    names = sorted({r.adapter for r in requests if r.adapter is not None})
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if names:
        model = PeftModel.from_pretrained(model, peft_dirs[names[0]], adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(peft_dirs[n], adapter_name=n)
    records = [runner.RequestRecord(r.index, r.adapter, r.arrival_s) for r in requests]

    def generate(req: Request, streamer: _TokenTimes | None = None) -> int:
        ids = req.prompt_ids if req.prompt_ids is not None else tokenizer.encode(req.prompt_text)
        x = torch.tensor([ids])
        kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=req.max_tokens,
                      min_new_tokens=req.max_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
        with torch.inference_mode():
            if req.adapter is None and names:
                with model.disable_adapter():
                    out = model.generate(input_ids=x, **kwargs)
            else:
                if req.adapter is not None:
                    model.set_adapter(req.adapter)
                out = model.generate(input_ids=x, **kwargs)
        return out.shape[1] - x.shape[1]

    generate(requests[0])  # warm-up, untimed (our server had one too)
    bar = tqdm(total=len(requests), desc="HF PEFT", unit="req", disable=not progress, leave=False)
    t0 = time.monotonic()
    for req, rec in zip(requests, records):
        wait = t0 + req.arrival_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # idle until the next arrival (open loop, one request at a time)
        if time.monotonic() - t0 > time_limit_s:
            rec.error = "time limit"
            continue
        streamer = _TokenTimes()
        rec.tokens = generate(req, streamer)
        rec.first_s, rec.done_s = streamer.times[1] - t0, streamer.times[-1] - t0
        bar.update(1)
    bar.close()
    done = [r.done_s for r in records if r.ok]
    wall = max(done) if done else time.monotonic() - t0
    return runner.RunResult("HF PEFT", records, wall, runner.summarize(records, wall, slo))


def report(result: dict) -> list[str]:
    c = result["config"]
    lines = [f"{c['adapters']} adapters of rank {c['rank']} ({c['mode']}), {c['requests']} requests at "
             f"{c['rate']} req/s; PEFT on {c['peft_threads']} torch threads, ours TP={c['tp']} (1 thread per rank)",
             ""]
    lines += compare.run_table(result["runs"], "server")
    lines += ["", f"anchor: {result['anchor']}",
              f"bdlora-ray / PEFT throughput: {result['ratios']['bdlora-ray / PEFT throughput']:.2f}x"]
    return lines
