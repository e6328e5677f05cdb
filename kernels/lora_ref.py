"""Pure-torch references for the paged BD-LoRA kernels.

These define the semantics that the Triton kernels in `lora_shrink_op.py` and
`lora_expand_op.py` must reproduce, and they are the CPU serving path.

Paged layout (shared with `bdlora_ray.memory` and `bdlora_ray.lora.layout`):
one layer of the unified pool is a tensor `pool` of shape (num_pages, P),
P = elements per page. An adapter slot `a` owns pages `page_table[a, :]`;
together they form its per-layer *virtual buffer*, in which element `v` lives
at `pool[page_table[a, v // P], v % P]`. A matrix of shape (rows, cols)
stored at virtual offset `off` is row-major there: element (j, k) is virtual
element `off + j * cols + k`. A factors are stored as they are, (rank, d_in);
B factors transposed, as B_s.T (rank, out_len): an expand then reads, per
rank row, contiguous output columns (batched products with contiguous rows
run several times faster on the CPU than over B's rank-wide rows).

Semantics, as torch pseudo-code (`A_s`, `B_s` read from the pages of slot a):

    shrink:  h[t, s, :rank[a, s]] = x[t] @ A_s.T            A_s: (rank[a,s], d_in)
    expand:  y[t, out_start[a,s] : out_start[a,s] + out_len[a,s]]
                 += scale[a] * h[t, s, :rank[a, s]] @ B_s.T   B_s: (out_len[a,s], rank[a,s])

with a = idx[t]; rows with idx[t] == -1 and slices with rank 0 are left
untouched (bit-identical), and h is zero there.
"""

from __future__ import annotations

import torch
from torch import Tensor


def read_paged(pool: Tensor, pages: Tensor, offset: int, rows: int, cols: int) -> Tensor:
    """Gather a (rows, cols) row-major matrix from a slot's virtual buffer."""
    page_elems = pool.shape[1]
    v = offset + torch.arange(rows * cols, device=pool.device)  # virtual element ids
    flat = pool[pages.long()[v // page_elems], v % page_elems]
    return flat.view(rows, cols)


def lora_shrink_ref(
    x: Tensor,           # (T, d_in) activations
    pool: Tensor,        # (num_pages, P) one layer of the unified pool
    page_table: Tensor,  # (S, max_pages) int32 physical page ids per slot
    idx: Tensor,         # (T,) int32 slot per token row, -1 = no adapter
    a_offset: Tensor,    # (S, n_slices) int64 virtual offset of A_s
    rank: Tensor,        # (S, n_slices) int32 rows of A_s (0 = slice absent)
    max_rank: int,       # R, width of the output
) -> Tensor:             # (T, n_slices, R) float32
    T, d_in = x.shape
    n_slices = a_offset.shape[1]
    h = torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
    for a in torch.unique(idx).tolist():
        if a < 0:
            continue
        rows = (idx == a).nonzero().squeeze(1)
        xa = x[rows].float()  # (Ta, d_in)
        for s in range(n_slices):
            r = int(rank[a, s])
            if r == 0:
                continue
            A = read_paged(pool, page_table[a], int(a_offset[a, s]), r, d_in).float()
            h[rows, s, :r] = xa @ A.T  # (Ta, r)
    return h


def lora_expand_ref(
    h: Tensor,           # (T, n_slices, R) float32 from shrink
    pool: Tensor,        # (num_pages, P)
    page_table: Tensor,  # (S, max_pages) int32
    idx: Tensor,         # (T,) int32, -1 = no adapter
    b_offset: Tensor,    # (S, n_slices) int64 virtual offset of B_s.T (stored transposed)
    rank: Tensor,        # (S, n_slices) int32 columns of B_s (0 = slice absent)
    out_start: Tensor,   # (S, n_slices) int32 first column of y that B_s writes
    out_len: Tensor,     # (S, n_slices) int32 rows of B_s = columns of y written
    scale: Tensor,       # (S,) float32
    y: Tensor,           # (T, d_out) updated in place
) -> Tensor:
    n_slices = b_offset.shape[1]
    for a in torch.unique(idx).tolist():
        if a < 0:
            continue
        rows = (idx == a).nonzero().squeeze(1)
        for s in range(n_slices):
            r = int(rank[a, s])
            if r == 0:
                continue
            n, o = int(out_len[a, s]), int(out_start[a, s])
            B = read_paged(pool, page_table[a], int(b_offset[a, s]), r, n).float().T  # stored as B.T (r, n)
            delta = float(scale[a]) * (h[rows, s, :r] @ B.T)  # (Ta, n)
            y[rows, o:o + n] = (y[rows, o:o + n].float() + delta).to(y.dtype)
    return y
