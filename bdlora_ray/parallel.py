"""Tensor-parallel layers, with the LoRA of a batch applied inside them.

Column-parallel (q|k|v, gate|up): input replicated, this rank owns a slice
of the outputs. Row-parallel (o, down): input sharded, partial outputs summed
by the all-reduce. The LoRA part goes through the kernels (`kernels`), and
adds a collective only for `slora` rows (README.md, "How it works"): an all-gather of the
rank-space vector after a column shrink, an all-reduce after a row shrink.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdlora_ray import kernels
from bdlora_ray.comm import Comm
from bdlora_ray.lora.batch import GroupMeta, LoraBatch


class LoraContext:
    """Holds the current step's LoRA batch; shared by every parallel linear."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None


def _shrink(x: Tensor, batch: LoraBatch, g: GroupMeta, layer: int) -> Tensor:
    return kernels.lora_shrink(x, batch.pool[layer], batch.page_table, batch.idx,
                               g.a_offset, g.rank_a, g.width, backend=batch.backend,
                               segments=batch.segments)  # (T, n_slices, R)


def _expand(h: Tensor, y: Tensor, batch: LoraBatch, g: GroupMeta, layer: int) -> None:
    kernels.lora_expand(h, batch.pool[layer], batch.page_table, batch.idx, g.b_offset, g.rank_b,
                        g.out_start, g.out_len, batch.scale, y, backend=batch.backend, segments=batch.segments)


def _merge_gathered(h: Tensor, gathered: Tensor, batch: LoraBatch, g: GroupMeta) -> Tensor:
    """For slora rows, h[t, s, :N*r] = concat over ranks j of gathered[j, t, s, :r], r = rank_a[idx[t], s].

    One gather over all rows and slices, with no host sync (a loop over adapters would read
    their ranks back to the host each layer)."""
    n, T, S, R = gathered.shape                                     # gathered: (N, T, S, R)
    r = g.rank_a[batch.idx.long().clamp(min=0)].long()[..., None]   # (T, S, 1) local rank of each row's slice
    p = torch.arange(R, device=h.device)                            # (R,) position in the merged vector
    rr = r.clamp(min=1)
    src = (p // rr).clamp(max=n - 1) * R + p % rr                   # (T, S, R): rank j's element c at j*R + c
    merged = gathered.permute(1, 2, 0, 3).reshape(T, S, n * R).gather(2, src)  # (T, S, R)
    take = (p < n * r) & g.slora_rows[:, None, None]
    return torch.where(take, merged.to(h.dtype), h)


class _ParallelLinear(nn.Module):
    """A linear holding this rank's slice of the weight; `group` names its LoRA targets."""

    def __init__(self, in_features: int, out_features: int, comm: Comm, ctx: LoraContext,
                 group: str, layer: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.comm, self.ctx, self.group, self.layer = comm, ctx, group, layer


class ColumnParallelLinear(_ParallelLinear):
    """Weight: this rank's output rows."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)  # (T, out_local)
        batch = self.ctx.batch
        if batch is not None and batch.groups[self.group].active:
            g = batch.groups[self.group]
            h = _shrink(x, batch, g, self.layer)
            if g.any_slora:
                h = _merge_gathered(h, self.comm.all_gather(h), batch, g)
            _expand(h, y, batch, g, self.layer)
        return y


class RowParallelLinear(_ParallelLinear):
    """Weight: this rank's input columns."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)  # (T, out) partial sum over ranks
        batch = self.ctx.batch
        if batch is not None and batch.groups[self.group].active:
            g = batch.groups[self.group]
            h = _shrink(x, batch, g, self.layer)  # (T, 1, R) partial for slora rows
            if g.any_slora:
                rows = g.slora_rows[:, None, None]
                h = torch.where(rows, self.comm.all_reduce(h * rows), h)
            _expand(h, y, batch, g, self.layer)  # before the base all-reduce: BD rides on it
        return self.comm.all_reduce(y)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, comm: Comm) -> None:
        super().__init__()
        self.comm = comm
        self.per_rank = vocab_size // comm.world_size
        self.start = comm.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (T, H)
        return self.comm.all_reduce(x.masked_fill(outside[:, None], 0))


class ParallelLMHead(nn.Module):
    """Vocab-parallel output projection: this rank's slice of the logits (T, V/N). Assembling
    them is `TPModel`'s: to every rank, or to rank 0 only when only rank 0 samples."""

    def __init__(self, embedding_or_dim: VocabParallelEmbedding | int, vocab_size: int, comm: Comm) -> None:
        super().__init__()
        self.comm = comm
        if isinstance(embedding_or_dim, VocabParallelEmbedding):
            self.tied = embedding_or_dim  # tied weights: same vocab slice
        else:
            self.tied = None
            self.weight = nn.Parameter(
                torch.empty(vocab_size // comm.world_size, embedding_or_dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.tied.weight if self.tied is not None else self.weight
        return F.linear(x, w)  # (T, V/N)
