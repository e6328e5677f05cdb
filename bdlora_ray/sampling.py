"""Next-token sampling: greedy, temperature, top-k, top-p, seeded per request.

A seeded request's RNG lives on the device of the logits it samples (a CUDA
`multinomial` refuses a CPU generator), so it is made there at first use.
A row that cannot be sampled (non-finite logits, a failing draw) yields a
`SamplingError` for that row only: the caller fails that request and keeps
the batch going.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdlora_ray.errors import BdloraError
from bdlora_ray.request import SamplingParams


class SamplingError(BdloraError):
    """One request's next token could not be sampled; the other rows of the batch are unaffected."""

    http_status = 500
    code = "sampling_error"


class RequestGenerator:
    """A request's seeded RNG, created on the device of the first logits it samples and kept there."""

    def __init__(self, seed: int) -> None:
        self.seed = seed & ((1 << 64) - 1)
        self._generator: torch.Generator | None = None

    def on(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        elif self._generator.device != device:  # a new generator would restart the stream
            raise SamplingError(f"seeded request moved from {self._generator.device} to {device}")
        return self._generator


Generator = RequestGenerator | torch.Generator | None


def make_generator(params: SamplingParams) -> RequestGenerator | None:
    return None if params.seed is None else RequestGenerator(params.seed)


def _torch_generator(generator: Generator, device: torch.device) -> torch.Generator | None:
    return generator.on(device) if isinstance(generator, RequestGenerator) else generator


def sample_row(logits: Tensor, params: SamplingParams, generator: Generator) -> int:
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
    return int(torch.multinomial(logits.softmax(-1), 1, generator=_torch_generator(generator, logits.device)))


def sample(logits: Tensor, params: list[SamplingParams], generators: list[Generator]) -> list[int | SamplingError]:
    """logits: (B, vocab) float32; one token per row, or the SamplingError of that row.

    Non-finite rows are refused before any draw: on CUDA a NaN reaching `multinomial` is a
    device-side assert that would poison every later step of the process, not just this row."""
    finite = torch.isfinite(logits).all(-1)                                     # (B,)
    greedy = [p.temperature == 0.0 for p in params]
    top = logits.argmax(-1).tolist() if any(greedy) else None
    out: list[int | SamplingError] = []
    for i, ok in enumerate(finite.tolist()):
        if not ok:
            out.append(SamplingError("the model produced non-finite logits for this request"))
        elif greedy[i]:
            out.append(top[i])
        else:
            try:
                out.append(sample_row(logits[i], params[i], generators[i]))
            except Exception as e:  # noqa: BLE001  this row's failure is this request's alone
                out.append(e if isinstance(e, SamplingError) else SamplingError(f"sampling failed: {e!r}"))
    return out
