"""Next-token sampling for a batch: logits processing, greedy / temperature / top-k / top-p draws,
log-probabilities, each request with its own parameters.

Every per-row parameter is applied as a batched tensor op over the rows that use it (vLLM V1's
sampler): rows without logit_bias, penalties, min_tokens, a grammar or logprobs pay nothing for
them. In order, on float32 logits (B, vocab):

    x = logits
    x[i, t] += bias[i][t]                                   logit_bias
    x[i, t] = x/rp if x > 0 else x*rp   for t in prompt+output    repetition_penalty (HF)
    x[i, t] -= f * count[i, t] + p * (count[i, t] > 0)      frequency/presence (OpenAI; output only)
    x[i, eos] = -inf   while len(output) < min_tokens       min_tokens
    x[i, t] = -inf     where the grammar forbids t          structured output (bdlora_ray.guided)
    greedy: argmax(x);  else: x / T, top-k, top-p, then argmax(softmax(x) / q), q ~ Exp(1)

The last line is a draw from softmax(x) (the Gumbel/exponential trick vLLM uses): one batched op,
with q drawn from a request's own generator for the seeded rows. Log-probabilities are those of
the model (log_softmax of the raw logits, as vLLM returns by default), not of the processed x.

A seeded request's RNG lives on the device of the logits it samples, so it is made there at first
use. A row that cannot be sampled (non-finite logits, everything masked) yields a `SamplingError`
for that row only: the caller fails that request and keeps the batch going.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from bdlora_ray.errors import BdloraError
from bdlora_ray.request import SamplingParams, TokenLogprob, TopLogprob


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


@dataclass
class Sampled:
    """One step's draws: a token (or the row's SamplingError) per row, and logprobs where requested."""

    tokens: list[int | SamplingError]
    logprobs: list[TokenLogprob | None]


def sample(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[Generator],
           histories: Sequence[tuple[Sequence[int], int]] | None = None, guides: Sequence[Any] | None = None,
           stop_ids: Sequence[int] = ()) -> Sampled:
    """logits: (B, vocab). `histories[i]` = (prompt + output token ids, prompt length) of row i (needed
    by penalties and min_tokens); `guides[i]` = row i's grammar matcher or None (advanced here by the
    token drawn); `stop_ids`: the tokens min_tokens holds back (EOS).

    Non-finite rows are refused before any draw (on CUDA a NaN reaching a draw could poison the step)."""
    finite = torch.isfinite(logits).all(-1)                                     # (B,)
    x = logits.float().masked_fill(~finite[:, None], 0.0)                      # a copy, processed in place
    _process(x, params, histories, guides, stop_ids)
    tokens = _draw(x, params, generators)                                       # (B,)
    ok = (finite & (x.amax(-1) > float("-inf"))).tolist()
    token_list = tokens.tolist()
    out: list[int | SamplingError] = [t if good else SamplingError(
        "the model produced non-finite logits for this request" if bad_logits else
        "every token was excluded (logit_bias / grammar)")
        for t, good, bad_logits in zip(token_list, ok, (~finite).tolist())]
    constrained = [i for i, g in enumerate(guides or ()) if g is not None and isinstance(out[i], int)]
    if constrained:
        from bdlora_ray.guided import accept_tokens
        for i, ok_i in zip(constrained, accept_tokens([guides[i] for i in constrained], [out[i] for i in constrained])):
            if not ok_i:
                out[i] = SamplingError(f"token {out[i]} was refused by the request's grammar")
    return Sampled(out, _logprobs(logits, tokens, token_list, params, ok))


def process_logits(logits: Tensor, params: Sequence[SamplingParams],
                   histories: Sequence[tuple[Sequence[int], int]] | None = None,
                   guides: Sequence[Any] | None = None, stop_ids: Sequence[int] = ()) -> Tensor:
    """A float32 copy of logits (B, V) with logit_bias, penalties, min_tokens and grammars applied
    (before temperature), each on the rows that use it."""
    x = logits.float().clone()
    _process(x, params, histories, guides, stop_ids)
    return x


def _process(x: Tensor, params: Sequence[SamplingParams], histories: Sequence[tuple[Sequence[int], int]] | None,
             guides: Sequence[Any] | None, stop_ids: Sequence[int]) -> None:
    _bias(x, params)
    if histories is not None:
        _penalties(x, params, histories)
        _min_tokens(x, params, histories, stop_ids)
    constrained = [i for i, g in enumerate(guides or ()) if g is not None]
    if constrained:
        from bdlora_ray.guided import apply_grammars  # only requests with a grammar import it
        apply_grammars(x, [guides[i] for i in constrained], constrained)


def sample_row(logits: Tensor, params: SamplingParams, generator: Generator) -> int:
    """One token from `logits` (vocab,)."""
    tok = sample(logits[None], [params], [generator]).tokens[0]
    if isinstance(tok, SamplingError):
        raise tok
    return tok


# ---- logits processing (in place on x, only on the rows that ask) --------------------------------

def _bias(x: Tensor, params: Sequence[SamplingParams]) -> None:
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return
    r = torch.tensor([i for i in rows for _ in params[i].logit_bias])
    t = torch.tensor([tok for i in rows for tok, _ in params[i].logit_bias])
    b = torch.tensor([bias for i in rows for _, bias in params[i].logit_bias], dtype=x.dtype)
    x.index_put_((r.to(x.device), t.to(x.device)), b.to(x.device), accumulate=True)


def _occurrences(rows: list[int], seqs: list[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Every token of seqs[j] as (row index in x, token id), flat, and each sequence's length: the
    penalties touch only these entries of x, never a whole (rows, vocab) block."""
    lens = torch.tensor([len(s) for s in seqs])
    flat = array("q", chain.from_iterable(seqs))                       # one C-level copy of the ids
    tok = torch.frombuffer(flat, dtype=torch.long) if len(flat) else torch.zeros(0, dtype=torch.long)
    row = torch.repeat_interleave(torch.tensor(rows), lens)
    return row.to(device), tok.to(device), lens


def _penalties(x: Tensor, params: Sequence[SamplingParams], histories: Sequence[tuple[Sequence[int], int]]) -> None:
    dev = x.device
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:  # HF: on prompt + output tokens, x / p where x > 0, x * p where x < 0 (once per token)
        r, t, lens = _occurrences(rep_rows, [histories[i][0] for i in rep_rows], dev)
        p = torch.repeat_interleave(torch.tensor([params[i].repetition_penalty for i in rep_rows]), lens).to(dev)
        v = x[r, t]
        x[r, t] = torch.where(v < 0, v * p, v / p)  # a repeated token writes the same value again
    fp_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if fp_rows:  # OpenAI: on output tokens, x -= frequency * count + presence * (count > 0)
        r, t, lens = _occurrences(fp_rows, [histories[i][0][histories[i][1]:] for i in fp_rows], dev)
        freq = torch.tensor([params[i].frequency_penalty for i in fp_rows])
        x.index_put_((r, t), -torch.repeat_interleave(freq, lens).to(dev), accumulate=True)
        pres = torch.zeros(x.shape[0])
        pres[fp_rows] = torch.tensor([params[i].presence_penalty for i in fp_rows])
        seen = torch.unique(r * x.shape[1] + t)                     # each (row, token) once
        rs, ts = seen // x.shape[1], seen % x.shape[1]
        x.index_put_((rs, ts), -pres.to(dev)[rs], accumulate=True)


def _min_tokens(x: Tensor, params: Sequence[SamplingParams], histories: Sequence[tuple[Sequence[int], int]],
                stop_ids: Sequence[int]) -> None:
    rows = [i for i, p in enumerate(params)
            if p.min_tokens and len(histories[i][0]) - histories[i][1] < p.min_tokens]
    if rows and stop_ids:
        r = torch.tensor(rows, device=x.device)[:, None]
        x[r, torch.tensor(list(stop_ids), device=x.device)[None, :]] = float("-inf")


# ---- the draw ------------------------------------------------------------------------------------

def _top_k_top_p(x: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """x (R, V) with what top-k (0 = all) excludes, then what top-p excludes from the rest (the
    smallest prefix of the sorted distribution whose mass reaches top_p, at least one token), -inf.
    One sort for both, as vLLM's apply_top_k_top_p; only the largest k if every row has a top-k."""
    kmax = max(top_k) if min(top_k) > 0 else 0
    vals, order = x.topk(kmax, -1) if 0 < kmax < x.shape[1] else x.sort(-1, descending=True)   # (R, K)
    k = torch.tensor(top_k, device=x.device)[:, None]
    rank = torch.arange(vals.shape[1], device=x.device)[None, :]
    drop = (k > 0) & (rank >= k)
    probs = vals.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= probs.cumsum(-1) - probs >= torch.tensor(top_p, device=x.device)[:, None]
    return torch.full_like(x, float("-inf")).scatter(1, order, vals.masked_fill(drop, float("-inf")))


def _draw(x: Tensor, params: Sequence[SamplingParams], generators: Sequence[Generator]) -> Tensor:
    tokens = x.argmax(-1)                                                       # greedy rows: done
    rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if not rows:
        return tokens
    dev = x.device
    r = torch.tensor(rows, device=dev)
    s = x[r] / torch.tensor([params[i].temperature for i in rows], device=dev)[:, None]
    cut = [j for j, i in enumerate(rows) if params[i].top_p < 1.0 or 0 < params[i].top_k < x.shape[1]]
    if cut:
        c = torch.tensor(cut, device=dev)
        s[c] = _top_k_top_p(s[c], [min(params[rows[j]].top_k, x.shape[1]) for j in cut],
                            [params[rows[j]].top_p for j in cut])
    q = torch.empty_like(s).exponential_()
    for j, i in enumerate(rows):  # only seeded rows: their own stream (as vLLM does)
        g = _torch_generator(generators[i], dev)
        if g is not None:
            q[j].exponential_(generator=g)
    tokens[r] = (s.softmax(-1) / q).argmax(-1)
    return tokens


def _logprobs(logits: Tensor, tokens: Tensor, token_list: list[int], params: Sequence[SamplingParams],
              ok: list[bool]) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None and ok[i]]
    if not rows:
        return out
    r = torch.tensor(rows, device=logits.device)
    lsm = torch.log_softmax(logits[r].float(), -1)                              # (R, V)
    chosen = lsm.gather(1, tokens[r][:, None])[:, 0].tolist()
    k = max(params[i].logprobs for i in rows)
    top_v, top_i = lsm.topk(k, -1) if k else (lsm[:, :0], lsm[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs
        out[i] = TokenLogprob(token_list[i], chosen[j],
                              tuple(TopLogprob(t, v) for t, v in zip(top_i[j][:n], top_v[j][:n])))
    return out
