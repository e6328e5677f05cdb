"""Causal attention over the flattened tokens of a step's sequences.

`AttentionMeta` says how the T rows split into sequences. Without a KV
cache each sequence attends causally to its own rows; with one
(`kv_cache` set), each layer first writes the rows' K and V into the
sequence's pages and then attends over the whole cached context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AttentionMeta:
    seq_lens: list[int]                      # new rows of each sequence, in row order
    context_lens: list[int] | None = None    # tokens already cached per sequence (paged mode)
    page_tables: list[Tensor] | None = None  # per sequence: its KV page ids, in order
    kv_cache: list[Tensor] | None = None     # per layer: (num_pages, 2, block_size, nkv, hd) views
    block_size: int = 16                     # tokens per KV page
    extra: dict = field(default_factory=dict)

    @property
    def paged(self) -> bool:
        return self.kv_cache is not None


def _write_kv(meta: AttentionMeta, layer: int, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Store a sequence's new K, V (n, nkv, hd) and return its whole context's K, V."""
    start, n = meta.context_lens[i], k.shape[0]
    pages = meta.page_tables[i].to(k.device, torch.long)
    kv = meta.kv_cache[layer]  # (pages, 2, block, nkv, hd)
    pos = torch.arange(start, start + n, device=k.device)
    page, slot = pages[pos // meta.block_size], pos % meta.block_size
    kv[page, 0, slot] = k.to(kv.dtype)
    kv[page, 1, slot] = v.to(kv.dtype)
    total = start + n
    allpos = torch.arange(total, device=k.device)
    page, slot = pages[allpos // meta.block_size], allpos % meta.block_size
    return kv[page, 0, slot].to(k.dtype), kv[page, 1, slot].to(v.dtype)  # (total, nkv, hd)


def attend(q: Tensor, k: Tensor, v: Tensor, meta: AttentionMeta, layer: int) -> Tensor:
    """q: (T, nh, hd); k, v: (T, nkv, hd) -> (T, nh, hd)."""
    out = torch.empty_like(q)
    row = 0
    for i, n in enumerate(meta.seq_lens):
        qi, ki, vi = q[row:row + n], k[row:row + n], v[row:row + n]
        if meta.paged:
            ki, vi = _write_kv(meta, layer, i, ki, vi)
        total = ki.shape[0]
        # Row j of this step sits at absolute position total - n + j and sees keys <= it.
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
        o = F.scaled_dot_product_attention(
            qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),   # (heads, n|total, hd)
            attn_mask=mask, enable_gqa=True)
        out[row:row + n] = o.transpose(0, 1)
        row += n
    return out
