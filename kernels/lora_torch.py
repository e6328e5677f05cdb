"""Vectorised torch versions of the paged LoRA ops: the CPU serving path.

Same signatures and semantics as `lora_ref` (read that first). Where the
reference loops over adapter slots, these gather every slot's factors from
the pool in one indexing op and then run one batched product over all rows
(vLLM's torch `bgmv`), so the cost follows rows and ranks, not the number of
distinct adapters.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gather_paged(pool: Tensor, page_table: Tensor, offset: Tensor, rows: int, cols: Tensor | int,
                 n_rows: Tensor, n_cols: Tensor) -> Tensor:
    """Every slot's and slice's (rows, C) matrix, zero outside (n_rows, n_cols).

    offset, n_rows, n_cols: (S, n_slices); cols: row stride, an int or (S, n_slices).
    Returns (S, n_slices, rows, C) float32, C = n_cols.max() (or cols when an int).
    """
    S, ns = offset.shape
    P = pool.shape[1]
    C = cols if isinstance(cols, int) else max(int(n_cols.max()), 1)
    stride = torch.as_tensor(cols, device=pool.device).expand(S, ns) if isinstance(cols, int) else cols
    j = torch.arange(rows, device=pool.device)[:, None]   # (rows, 1)
    k = torch.arange(C, device=pool.device)[None, :]      # (1, C)
    v = offset[:, :, None, None] + j * stride[:, :, None, None].long() + k  # (S, ns, rows, C) virtual ids
    valid = (j < n_rows[:, :, None, None]) & (k < n_cols[:, :, None, None])
    v = torch.where(valid, v, 0)
    pages = torch.gather(page_table.long(), 1, (v // P).reshape(S, -1)).view_as(v)
    w = pool.reshape(-1)[pages * P + v % P].float()
    return w.masked_fill_(~valid, 0.0)


def lora_shrink_torch(x: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, a_offset: Tensor,
                      rank: Tensor, max_rank: int) -> Tensor:
    T, d_in = x.shape
    n_slices = a_offset.shape[1]
    h = torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
    rows = (idx >= 0).nonzero().squeeze(1)
    if len(rows) == 0 or max_rank == 0:
        return h
    full = torch.full_like(rank, d_in)
    A = gather_paged(pool, page_table, a_offset.long(), max_rank, d_in, rank, full)  # (S, ns, R, d_in)
    slot = idx[rows].long()
    h[rows] = torch.einsum("td,tsrd->tsr", x[rows].float(), A[slot])
    return h


def lora_expand_torch(h: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, b_offset: Tensor, rank: Tensor,
                      out_start: Tensor, out_len: Tensor, scale: Tensor, y: Tensor) -> Tensor:
    rows = (idx >= 0).nonzero().squeeze(1)
    if len(rows) == 0 or int(rank.max()) == 0:
        return y
    n_max = int(out_len.max())
    R = h.shape[2]
    # B_s is (out_len, rank) row-major: its row stride is the slot's own rank.
    B = gather_paged(pool, page_table, b_offset.long(), n_max, rank.long(), out_len, rank)  # (S, ns, N, r_max)
    r_max = B.shape[3]
    slot = idx[rows].long()
    hr = h[rows, :, :min(R, r_max)]
    delta = torch.einsum("tsr,tsnr->tsn", hr, B[slot][..., :hr.shape[2]]) * scale[slot][:, None, None].float()
    n = torch.arange(n_max, device=y.device)
    live = (n < out_len[slot][:, :, None]) & (rank[slot][:, :, None] > 0)   # (Tr, ns, N)
    cols = out_start[slot][:, :, None].long() + n                           # (Tr, ns, N)
    t_idx = torch.arange(len(rows), device=y.device)[:, None, None].expand_as(cols)
    acc = y[rows].float()
    acc.index_put_((t_idx[live], cols[live]), delta[live], accumulate=True)  # slices write disjoint columns
    y[rows] = acc.to(y.dtype)
    return y
