"""Drive an OpenAI-compatible server open-loop and measure it.

Open loop: every request is sent at its arrival time whatever the server is
doing (one asyncio task per request, asleep until then), so a slow server
builds a queue instead of slowing the client down, as in S-LoRA's and vLLM's
serving benchmarks. Each request streams `/v1/completions` (token-id prompt,
greedy, EOS ignored so it generates exactly `max_tokens`, usage in the last
chunk) over httpx. The whole run is bounded by `time_limit_s`: what has not
finished by then is cancelled and counted as an error ("time limit").

Latency definitions (all from the request's scheduled arrival, so client lag
counts against the server):
- TTFT: arrival -> first token. Our API starts the response only when the
  first token exists (deploy/api.py awaits the first engine event), so by
  default the response start marks it (`ttft_at="response"`); for a server
  that answers before generating, use `ttft_at="first_text"` (first chunk
  with text).
- per-token latency (TPOT): (last chunk - first token) / (tokens - 1), per
  request; requests of one token have none.
- SLO attainment: the fraction of ALL requests that finished without error
  with TTFT <= slo.ttft_s and TPOT <= slo.tpot_s.
Throughput: successful requests and their generated tokens over the run's
makespan (start -> last completion).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm

from bench.workload import Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0       # time to first token, seconds
    tpot_s: float = 0.25      # time per output token after the first, seconds


@dataclass(frozen=True)
class RunnerConfig:
    base_url: str                       # http://127.0.0.1:PORT (loopback in benchmarks)
    base_model: str                     # the served base model's name (requests with no adapter)
    time_limit_s: float = 300.0         # bound on the whole run
    request_timeout_s: float = 120.0    # connect / gap between two chunks of one stream
    slo: SLO = SLO()
    ttft_at: str = "response"           # "response" | "first_text" (see the module docstring)
    progress: bool = True               # tqdm bar of finished requests
    label: str = ""                     # shown on the progress bar

    def __post_init__(self) -> None:
        if self.ttft_at not in ("response", "first_text"):
            raise ValueError(f"ttft_at must be 'response' or 'first_text', got {self.ttft_at!r}")
        if self.time_limit_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("time_limit_s and request_timeout_s must be positive")


@dataclass
class RequestRecord:
    index: int
    adapter: str | None
    arrival_s: float                    # scheduled, from the run's start
    first_s: float | None = None        # first token, from the run's start
    done_s: float | None = None         # last chunk, from the run's start
    tokens: int = 0                     # generated tokens (the server's usage count)
    error: str | None = None            # None: finished normally

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_s is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_s is None else self.first_s - self.arrival_s

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.first_s is None or self.tokens < 2:
            return None
        return (self.done_s - self.first_s) / (self.tokens - 1)


@dataclass
class RunResult:
    label: str
    records: list[RequestRecord]
    wall_s: float                       # run start -> last completion (or the time limit)
    summary: dict = field(default_factory=dict)

    def to_dict(self, with_records: bool = True) -> dict:
        out = {"label": self.label, "wall_s": self.wall_s, "summary": self.summary}
        if with_records:
            out["records"] = [asdict(r) for r in self.records]
        return out


# ---- metrics (pure) -------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); NaN if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a[k] / b[k] (rates measured in the same round k): the noise of one
    round of a shared machine hits both sides of its ratio."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def distribution(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values) if values else math.nan,
            "p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99)}


def summarize(records: list[RequestRecord], wall_s: float, slo: SLO) -> dict:
    """Throughput, latency percentiles, SLO attainment and errors of one run."""
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    tokens = sum(r.tokens for r in ok)
    meets = [r for r in ok if r.ttft is not None and r.ttft <= slo.ttft_s and (r.tpot is None or r.tpot <= slo.tpot_s)]
    errors = Counter(r.error for r in records if not r.ok)
    return {
        "requests": len(records), "ok": len(ok), "errors": sum(errors.values()),
        "error_kinds": dict(errors), "wall_s": wall_s, "tokens": tokens,
        "req_per_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else math.nan,
        "ttft_s": distribution(ttfts), "tpot_s": distribution(tpots),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s,
                "attainment": len(meets) / len(records) if records else math.nan},
    }


# ---- the open-loop driver -----------------------------------------------------------

def request_body(req: Request, base_model: str) -> dict:
    return {"model": req.adapter or base_model,
            "prompt": list(req.prompt_ids) if req.prompt_ids is not None else req.prompt_text,
            "max_tokens": req.max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def _one(client: httpx.AsyncClient, req: Request, rec: RequestRecord, cfg: RunnerConfig, t0: float) -> None:
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
    try:
        async with client.stream("POST", "/v1/completions", json=request_body(req, cfg.base_model)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                rec.error = f"HTTP {r.status_code} {_error_code(body)}".strip()
                return
            if cfg.ttft_at == "response":
                rec.first_s = time.monotonic() - t0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                now = time.monotonic() - t0
                if data == "[DONE]":
                    rec.done_s = now
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = f"stream error {chunk['error'].get('code') or chunk['error'].get('type')}"
                    return
                if rec.first_s is None and any(c.get("text") for c in chunk.get("choices", ())):
                    rec.first_s = now
                if chunk.get("usage"):
                    rec.tokens = int(chunk["usage"]["completion_tokens"])
            if rec.done_s is None:
                rec.error = "stream ended without [DONE]"
            elif rec.first_s is None:
                rec.error = "no tokens"
    except httpx.HTTPError as e:
        rec.error = type(e).__name__
    except Exception as e:  # a malformed answer: count it, keep the run going
        log.warning("request %d: %s: %s", req.index, type(e).__name__, e)
        rec.error = f"client {type(e).__name__}"


def _error_code(body: str) -> str:
    try:
        err = json.loads(body)["error"]
        return str(err.get("code") or err.get("type") or "")
    except (ValueError, KeyError, TypeError):
        return ""


async def run_async(requests: list[Request], cfg: RunnerConfig) -> RunResult:
    records = [RequestRecord(r.index, r.adapter, r.arrival_s) for r in requests]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(cfg.request_timeout_s)
    bar = tqdm(total=len(requests), desc=cfg.label or "requests", unit="req", disable=not cfg.progress,
               leave=False)
    async with httpx.AsyncClient(base_url=cfg.base_url, limits=limits, timeout=timeout) as client:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(_one(client, q, rec, cfg, t0)) for q, rec in zip(requests, records)]
        for t in tasks:
            t.add_done_callback(lambda _: bar.update(1))
        _, pending = await asyncio.wait(tasks, timeout=cfg.time_limit_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        end = time.monotonic() - t0
    bar.close()
    for rec in records:
        if rec.done_s is None and rec.error is None:
            rec.error = "time limit"
    if pending:
        log.warning("%s: %d of %d requests unfinished after the %.0f s time limit", cfg.label, len(pending),
                    len(requests), cfg.time_limit_s)
    done = [r.done_s for r in records if r.ok]
    wall = max(done) if done and not pending else end
    return RunResult(cfg.label, records, wall, summarize(records, wall, cfg.slo))


def run(requests: list[Request], cfg: RunnerConfig) -> RunResult:
    """Replay `requests` against the server at `cfg.base_url` (blocks; runs its own event loop)."""
    if not requests:
        raise ValueError("no requests to run")
    return asyncio.run(run_async(requests, cfg))


def merge(results: list[RunResult], label: str, slo: SLO) -> RunResult:
    """Repeated runs of one variant as one: their requests pooled, their makespans added."""
    records = [r for res in results for r in res.records]
    wall = sum(res.wall_s for res in results)
    return RunResult(label, records, wall, summarize(records, wall, slo))
