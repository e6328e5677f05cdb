"""Benchmark workloads as in S-LoRA's benchmarks: who asks for which adapter, when, and how much.

    adapter popularity   S-LoRA's power law: x ~ Power(alpha) on [0, 1] (density alpha * x**(alpha-1)),
                         adapter floor(x * n); so P(adapter k) = ((k+1)/n)**alpha - (k/n)**alpha.
                         alpha = 1: uniform (S-LoRA's default); alpha < 1: adapter 0 the most popular,
                         a long tail after it (S-LoRA sweeps 0.1..1)
    arrivals             gaps between requests ~ Gamma(shape = 1/cv², scale = cv² / rate):
                         mean rate `rate` req/s, coefficient of variation `cv` (cv = 1: Poisson)
    lengths              prompt and output lengths uniform in inclusive ranges

Everything is drawn from one seeded generator, so a config gives the same
requests every time. `read_trace` replays a recorded trace instead (JSONL,
one request per line, see `TraceRequest`), validated line by line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bdlora_ray.errors import AdapterNameInvalid
from bdlora_ray.store.manifest import check_name

# Prompt token ids are drawn from the byte range of the byte-level tokenizer (ids 3..258 are bytes).
PROMPT_TOKEN_RANGE = (3, 259)


@dataclass(frozen=True)
class WorkloadConfig:
    num_requests: int = 200
    num_adapters: int = 100                  # distinct adapters; 0 = every request uses the base model
    alpha: float = 1.0                       # power-law exponent of adapter popularity (1 = uniform)
    rate: float = 8.0                        # mean arrivals per second
    cv: float = 1.0                          # coefficient of variation of inter-arrival gaps
    input_len: tuple[int, int] = (8, 64)     # prompt tokens, inclusive range
    output_len: tuple[int, int] = (8, 32)    # generated tokens (max_tokens, EOS ignored), inclusive range
    adapter_prefix: str = "adapter"          # adapter k is named f"{adapter_prefix}-{k}"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.num_adapters < 0:
            raise ValueError("num_requests must be >= 1 and num_adapters >= 0")
        if self.alpha <= 0 or self.rate <= 0 or self.cv <= 0:
            raise ValueError(f"need alpha > 0, rate > 0, cv > 0; got {self.alpha}, {self.rate}, {self.cv}")
        for what, (lo, hi) in (("input_len", self.input_len), ("output_len", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{what} must be an inclusive range 1 <= lo <= hi, got {(lo, hi)}")

    def adapter_names(self) -> list[str]:
        return [adapter_name(self.adapter_prefix, k) for k in range(self.num_adapters)]


@dataclass(frozen=True)
class Request:
    index: int                          # position in arrival order
    arrival_s: float                    # seconds after the start of the run
    adapter: str | None                 # None: the base model
    prompt_ids: tuple[int, ...] | None  # token-id prompt, or
    prompt_text: str | None             # a text prompt (trace replay)
    max_tokens: int                     # tokens to generate (EOS ignored)

    @property
    def prompt_len(self) -> int:
        """Prompt tokens (for a text prompt: its UTF-8 bytes, what the byte-level tokenizer makes)."""
        return len(self.prompt_ids) if self.prompt_ids is not None else len(self.prompt_text.encode())


def adapter_name(prefix: str, k: int) -> str:
    return check_name(f"{prefix}-{k}")


def popularity(num_adapters: int, alpha: float) -> np.ndarray:
    """P(adapter k) = ((k+1)/n)**alpha - (k/n)**alpha, k = 0..n-1: S-LoRA's floor(Power(alpha) * n)."""
    edges = (np.arange(num_adapters + 1, dtype=np.float64) / num_adapters) ** alpha
    p = np.diff(edges)
    return p / p.sum()


def gamma_arrivals(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of n requests: the first at 0, then Gamma gaps of mean 1/rate and the given cv."""
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def generate(config: WorkloadConfig) -> list[Request]:
    """The requests of `config`, in arrival order (seeded: the same config, the same requests)."""
    c = config
    rng = np.random.default_rng(c.seed)
    arrivals = gamma_arrivals(c.num_requests, c.rate, c.cv, rng)
    names = c.adapter_names()
    picks = rng.choice(len(names), size=c.num_requests, p=popularity(len(names), c.alpha)) if names else None
    in_lens = rng.integers(c.input_len[0], c.input_len[1] + 1, size=c.num_requests)
    out_lens = rng.integers(c.output_len[0], c.output_len[1] + 1, size=c.num_requests)
    out = []
    for i in range(c.num_requests):
        prompt = rng.integers(*PROMPT_TOKEN_RANGE, size=int(in_lens[i]))
        out.append(Request(index=i, arrival_s=float(arrivals[i]),
                           adapter=names[picks[i]] if picks is not None else None,
                           prompt_ids=tuple(int(t) for t in prompt), prompt_text=None,
                           max_tokens=int(out_lens[i])))
    return out


def summarize(requests: list[Request]) -> dict:
    """What a workload is: counts, offered rate, lengths, adapter spread (for reports)."""
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.adapter or ""] = counts.get(r.adapter or "", 0) + 1
    span = requests[-1].arrival_s - requests[0].arrival_s if len(requests) > 1 else 0.0
    return {"requests": len(requests), "distinct_adapters": len([k for k in counts if k]),
            "offered_rate": (len(requests) - 1) / span if span > 0 else float("inf"),
            "duration_s": span, "prompt_tokens": sum(r.prompt_len for r in requests),
            "output_tokens": sum(r.max_tokens for r in requests),
            "top_adapter_share": max(counts.values()) / len(requests)}


# ---- traces ------------------------------------------------------------------

class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the line."""


_TRACE_KEYS = {"arrival_s", "adapter", "prompt_len", "prompt", "max_tokens"}


def write_trace(requests: list[Request], path: str | Path) -> Path:
    """One JSON object per line: arrival_s, adapter (null: base), prompt (token ids or text), max_tokens."""
    path = Path(path)
    with path.open("w") as f:
        for r in requests:
            prompt = list(r.prompt_ids) if r.prompt_ids is not None else r.prompt_text
            f.write(json.dumps({"arrival_s": r.arrival_s, "adapter": r.adapter, "prompt": prompt,
                                "max_tokens": r.max_tokens}) + "\n")
    return path


def read_trace(path: str | Path, seed: int = 0) -> list[Request]:
    """Requests from a JSONL trace, sorted by arrival (ties keep file order).

    Each line: {"arrival_s": seconds >= 0, "adapter": name or null, "max_tokens": int >= 1, and either
    "prompt": text or token ids, or "prompt_len": int >= 1 (random token ids, seeded by `seed`)}.
    Unknown keys are errors (a misspelt key must not be silently ignored).
    """
    rng = np.random.default_rng(seed)
    rows = []
    text = Path(path).read_text()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(_trace_row(line, rng))
        except TraceError as e:
            raise TraceError(f"{path}:{n}: {e}") from None
    if not rows:
        raise TraceError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    return [Request(index=i, arrival_s=a, adapter=ad, prompt_ids=ids, prompt_text=txt, max_tokens=m)
            for i, (a, ad, ids, txt, m) in enumerate(rows)]


def _trace_row(line: str, rng: np.random.Generator) -> tuple:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"not JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise TraceError("a line must be a JSON object")
    if unknown := sorted(set(d) - _TRACE_KEYS):
        raise TraceError(f"unknown keys {unknown}; expected {sorted(_TRACE_KEYS)}")
    arrival = d.get("arrival_s")
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not math.isfinite(arrival) \
            or arrival < 0:
        raise TraceError(f"arrival_s must be a finite number >= 0, got {arrival!r}")
    adapter = d.get("adapter")
    if adapter is not None:
        try:
            adapter = check_name(adapter)
        except AdapterNameInvalid as e:
            raise TraceError(f"adapter: {e}") from None
    max_tokens = d.get("max_tokens")
    if not _positive_int(max_tokens):
        raise TraceError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    has_prompt, has_len = "prompt" in d, "prompt_len" in d
    if has_prompt == has_len:
        raise TraceError("give exactly one of 'prompt' and 'prompt_len'")
    ids, txt = None, None
    if has_len:
        if not _positive_int(d["prompt_len"]):
            raise TraceError(f"prompt_len must be an integer >= 1, got {d['prompt_len']!r}")
        ids = tuple(int(t) for t in rng.integers(*PROMPT_TOKEN_RANGE, size=d["prompt_len"]))
    elif isinstance(d["prompt"], str) and d["prompt"]:
        txt = d["prompt"]
    elif isinstance(d["prompt"], list) and d["prompt"] and all(_positive_int(t) or t == 0 for t in d["prompt"]):
        ids = tuple(d["prompt"])
    else:
        raise TraceError("prompt must be a non-empty string or a non-empty list of token ids >= 0")
    return float(arrival), adapter, ids, txt, int(max_tokens)


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1

