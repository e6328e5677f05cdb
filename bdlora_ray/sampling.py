"""Next-token sampling: greedy, temperature, top-k, top-p, seeded per request."""

from __future__ import annotations

import torch
from torch import Tensor

from bdlora_ray.request import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed & ((1 << 64) - 1))
    return g


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from `logits` (vocab,) float32."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        probs, order = torch.sort(logits.softmax(-1), descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: (B, vocab) float32; one token per row."""
    greedy = [p.temperature == 0.0 for p in params]
    top = logits.argmax(-1).tolist() if any(greedy) else None
    return [top[i] if g else sample_row(logits[i], params[i], generators[i]) for i, g in enumerate(greedy)]
