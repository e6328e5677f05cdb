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
from torch.nn.utils.rnn import pad_sequence


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


@dataclass
class _PagedPlan:
    """Where one step's rows go in the KV pages, and what its decode rows read: the same in every
    layer, so computed once per step (`AttentionMeta.plan`)."""

    write_page: Tensor        # (T,) page of each new row's K, V
    write_slot: Tensor        # (T,) slot in that page
    decode_rows: Tensor       # (D,) rows of the sequences that add one row this step
    read_page: Tensor         # (D, L) pages of each decode sequence's context, L = longest context
    read_slot: Tensor         # (D, L)
    read_mask: Tensor         # (D, 1, 1, L) True for the sequence's own positions
    prefill: list[tuple[int, int, Tensor, Tensor, Tensor | None]]  # (first row, rows, pages, slots of the whole
    #   context, causal mask (rows, context) when rows follow a cached context (a prefill piece, a prefix hit))


def _plan(meta: AttentionMeta, device: torch.device) -> _PagedPlan:
    if meta.seq_lens and all(n == 1 for n in meta.seq_lens):
        return _decode_plan(meta, device)
    return _rows_plan(meta, device)


def _decode_plan(meta: AttentionMeta, device: torch.device) -> _PagedPlan:
    """A step of decodes only (one new row per sequence): the plan from the padded block tables in a
    few tensor ops, no Python per sequence; the same tensors as `_rows_plan` builds."""
    b, D = meta.block_size, len(meta.seq_lens)
    totals = torch.tensor(meta.context_lens, dtype=torch.long, device=device) + 1           # (D,)
    pages = pad_sequence(list(meta.page_tables), batch_first=True).to(device, torch.long)   # (D, P)
    pos = torch.arange(int(totals.max()), device=device)                                    # (L,)
    own = pos[None] < totals[:, None]                                                       # (D, L)
    at = (pos // b).clamp(max=pages.shape[1] - 1).expand(D, -1)
    read_page = torch.where(own, pages.gather(1, at), 0)
    read_slot = torch.where(own, (pos % b).expand(D, -1), 0)
    rows = torch.arange(D, device=device)
    return _PagedPlan(read_page[rows, totals - 1], (totals - 1) % b, rows, read_page, read_slot,
                      own[:, None, None, :], [])


def _rows_plan(meta: AttentionMeta, device: torch.device) -> _PagedPlan:
    """Any step (prefill pieces, prefix hits, decodes), sequence by sequence."""
    b = meta.block_size
    write_page, write_slot, decode_rows, reads, prefill = [], [], [], [], []
    row = 0
    for i, n in enumerate(meta.seq_lens):
        pages = meta.page_tables[i].to(device, torch.long)
        total = meta.context_lens[i] + n
        pos = torch.arange(total, device=device)
        page, slot = pages[pos // b], pos % b
        write_page.append(page[total - n:])
        write_slot.append(slot[total - n:])
        if n == 1:
            decode_rows.append(row)
            reads.append((page, slot))
        else:
            # Row j sits at absolute position total - n + j and sees keys <= it.
            mask = torch.ones(n, total, dtype=torch.bool, device=device).tril(total - n) if n < total else None
            prefill.append((row, n, page, slot, mask))
        row += n
    D, L = len(reads), max((len(p) for p, _ in reads), default=0)
    read_page = torch.zeros(D, L, dtype=torch.long, device=device)
    read_slot = torch.zeros(D, L, dtype=torch.long, device=device)
    read_mask = torch.zeros(D, 1, 1, L, dtype=torch.bool, device=device)
    for d, (page, slot) in enumerate(reads):
        read_page[d, :len(page)], read_slot[d, :len(slot)], read_mask[d, ..., :len(page)] = page, slot, True
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long, device=device)  # noqa: E731
    return _PagedPlan(cat(write_page), cat(write_slot), torch.tensor(decode_rows, dtype=torch.long, device=device),
                      read_page, read_slot, read_mask, prefill)


def _attend_paged(q: Tensor, k: Tensor, v: Tensor, meta: AttentionMeta, layer: int) -> Tensor:
    """Every row's K, V into its pages (one write), then all single-row (decode) sequences in one
    padded, masked attention over their gathered contexts; multi-row (prefill) sequences one by one."""
    plan = meta.extra.get("paged_plan")
    if plan is None:
        plan = meta.extra["paged_plan"] = _plan(meta, q.device)
    kv = meta.kv_cache[layer]  # (pages, 2, block, nkv, hd)
    kv[plan.write_page, 0, plan.write_slot] = k.to(kv.dtype)
    kv[plan.write_page, 1, plan.write_slot] = v.to(kv.dtype)
    out = torch.empty_like(q)
    if len(plan.decode_rows):
        kd = kv[plan.read_page, 0, plan.read_slot].to(q.dtype)   # (D, L, nkv, hd)
        vd = kv[plan.read_page, 1, plan.read_slot].to(q.dtype)
        out[plan.decode_rows] = _decode(q[plan.decode_rows], kd, vd, plan.read_mask)
    for row, n, page, slot, mask in plan.prefill:
        out[row:row + n] = _causal(q[row:row + n], kv[page, 0, slot].to(q.dtype), kv[page, 1, slot].to(q.dtype), mask)
    return out


def _decode(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One query row per sequence: q (D, nh, hd); k, v (D, L, nkv, hd); mask (D, 1, 1, L) -> (D, nh, hd).

    The nh / nkv query heads that share a KV head are laid out as that head's query rows, so the
    attention runs over the KV heads as they are: no K/V repeated per query head, and no
    `enable_gqa`, which on CUDA together with a mask leaves only the math backend (full score
    matrices in memory); a boolean mask alone is served by the memory-efficient kernel."""
    D, nh, hd = q.shape
    nkv = k.shape[2]
    qg = q.view(D, nkv, nh // nkv, hd)                                                # (D, nkv, g, hd)
    o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)  # (D, nkv, g, hd)
    return o.reshape(D, nh, hd)


def _causal(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """One sequence: q (n, nh, hd) at the last n of the total positions of k, v (total, nkv, hd);
    `mask` (n, total) when n < total (else built here), True where a row may look."""
    n, total = q.shape[0], k.shape[0]
    if n == total:  # the whole sequence is new: plain causal, no mask, so CUDA can use flash attention
        # (1, heads, n|total, hd): SDPA's fused kernels take 4-D inputs only, 3-D ones fall to the math path.
        qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    # New rows after a cached context (SDPA's is_causal is top-left aligned, so a mask). As in `_decode`,
    # the nh / nkv query heads of a KV head become that head's query rows, (g, n) ordered, so that no
    # `enable_gqa` beside the mask leaves CUDA only the math backend.
    if mask is None:
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
    nh, hd, nkv = q.shape[1], q.shape[2], k.shape[1]
    g = nh // nkv
    qg = q.view(n, nkv, g, hd).permute(1, 2, 0, 3).reshape(1, nkv, g * n, hd)        # (1, nkv, g*n, hd)
    o = F.scaled_dot_product_attention(qg, k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask.repeat(g, 1))                    # (1, nkv, g*n, hd)
    return o.view(nkv, g, n, hd).permute(2, 0, 1, 3).reshape(n, nh, hd)


def attend(q: Tensor, k: Tensor, v: Tensor, meta: AttentionMeta, layer: int) -> Tensor:
    """q: (T, nh, hd); k, v: (T, nkv, hd) -> (T, nh, hd)."""
    if meta.paged:
        return _attend_paged(q, k, v, meta, layer)
    out = torch.empty_like(q)
    row = 0
    for n in meta.seq_lens:
        out[row:row + n] = _causal(q[row:row + n], k[row:row + n], v[row:row + n])
        row += n
    return out
