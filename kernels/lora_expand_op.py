"""Triton LoRA expand over the paged pool: y[:, cols of slice s] += scale * h_s @ B_s.T.

Semantics are `kernels.lora_ref.lora_expand_ref`'s exactly. Launch shapes,
batch layout and paged reads are shared with the shrink (`lora_shrink_op.py`):
one program per token row (decode) or per tile of rows of one slot
(prefill), times slice, times tile of output columns. Rows with no slot,
slices of rank 0 and columns past out_len are never loaded or stored, so y
stays bit-identical there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lora_shrink_op import (Segments, TileConfig, check_lora_args, is_interpreted, launch_rows, load_paged, mma,
                             mma_kind, program_rows, resolve_segments, sorted_block_m)


@triton.jit
def _expand_kernel(
    # pointers
    h_ptr, pool_ptr, page_table_ptr, idx_ptr, order_ptr, tile_start_ptr,
    b_offset_ptr, rank_ptr, out_start_ptr, out_len_ptr, scale_ptr, y_ptr,
    # sizes
    T,
    # strides
    stride_ht, stride_hs, stride_hr,
    stride_pool_page, stride_pool_elem,
    stride_pt_slot, stride_pt_page,
    stride_off_slot, stride_off_slice,
    stride_rank_slot, stride_rank_slice,
    stride_os_slot, stride_os_slice,
    stride_ol_slot, stride_ol_slice,
    stride_yt, stride_yn,
    # meta-parameters
    PAGE: tl.constexpr, SORTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MMA: tl.constexpr, DOT_F32: tl.constexpr,
):
    """y[tok, o + n] += scale[a] * sum_k h[tok, s, k] * B_s[n, k] for this program's
    rows, slice s and column tile n < out_len[a, s]; nothing at all otherwise. B_s is
    stored transposed: B_s[n, k] is virtual element off + k * out_len + n."""
    tok, row_mask, a = program_rows(idx_ptr, order_ptr, tile_start_ptr, T, SORTED, BLOCK_M)
    s = tl.program_id(1)
    pid_n = tl.program_id(2)
    if a < 0:
        return
    rank = tl.load(rank_ptr + a * stride_rank_slot + s * stride_rank_slice)
    n_len = tl.load(out_len_ptr + a * stride_ol_slot + s * stride_ol_slice)
    if (rank == 0) | (pid_n * BLOCK_N >= n_len):
        return
    off = tl.load(b_offset_ptr + a * stride_off_slot + s * stride_off_slice).to(tl.int32)
    o = tl.load(out_start_ptr + a * stride_os_slot + s * stride_os_slice)
    scale = tl.load(scale_ptr + a)
    pages_ptr = page_table_ptr + a.to(tl.int64) * stride_pt_slot

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of B_s = columns o + n of y
    n_mask = n < n_len
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < rank
        hk = tl.load(h_ptr + tok[:, None] * stride_ht + s * stride_hs + k[None, :] * stride_hr,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        v = off + k[:, None] * n_len + n[None, :]  # (BLOCK_K, BLOCK_N) virtual ids of B_s^T, stored row-major
        w = load_paged(pool_ptr, pages_ptr, v, k_mask[:, None] & n_mask[None, :],
                       stride_pt_page, stride_pool_page, stride_pool_elem, PAGE)
        acc = mma(acc, hk, w, MMA, DOT_F32)

    y_ptrs = y_ptr + tok[:, None] * stride_yt + (o + n[None, :]) * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    # Same rounding as the reference: fp32 sum, one cast back to y's dtype.
    tl.store(y_ptrs, (y.to(tl.float32) + scale * acc).to(y.dtype), mask=y_mask)


def expand_config(T: int, d_out: int, max_rank: int, device: torch.device,
                  segments: Segments | None = None) -> TileConfig:
    """Default tiling. Interpreter: few, large programs. GPU: sorted tiles above
    ROWS_MAX_T rows (lora_shrink_op.py) or when segments are given; the whole rank in one step."""
    r_block = triton.next_power_of_2(max_rank)
    block_m = sorted_block_m(T, segments)
    if is_interpreted(device):
        return TileConfig(sorted=block_m is not None, block_m=block_m or 1,
                          block_n=min(64, triton.next_power_of_2(d_out)), block_k=r_block)
    if block_m is not None:
        return TileConfig(sorted=True, block_m=block_m, block_n=128, block_k=max(16, min(r_block, 64)))
    return TileConfig(sorted=False, block_m=1, block_n=128, block_k=min(r_block, 64))


def lora_expand(
    h: Tensor,           # (T, n_slices, R) float32 from shrink
    pool: Tensor,        # (num_pages, P) one layer of the unified pool
    page_table: Tensor,  # (S, max_pages) int32
    idx: Tensor,         # (T,) int32, -1 = no adapter
    b_offset: Tensor,    # (S, n_slices) int64 virtual offset of B_s, stored transposed: B_s.T (r, n) row-major
    rank: Tensor,        # (S, n_slices) int32 columns of B_s (0 = slice absent), each <= R
    out_start: Tensor,   # (S, n_slices) int32 first column of y that B_s writes
    out_len: Tensor,     # (S, n_slices) int32 rows of B_s; column ranges of one slot's slices are disjoint
    scale: Tensor,       # (S,) float32
    y: Tensor,           # (T, d_out) updated in place
    *,
    segments: Segments | None = None,  # from lora_segments(idx, ...), reused across layers
    config: TileConfig | None = None,  # override the default tiling (tests, tuning)
) -> Tensor:
    """In place, one launch for all slices; returns y. Per row t with a = idx[t] >= 0
    and slice s with r = rank[a, s] > 0, o = out_start[a, s], n = out_len[a, s]:

        B_s_T = pool[page_table[a, v // P], v % P] for v in b_offset[a, s] + arange(r * n)
        y[t, o:o + n] = (y[t, o:o + n].float() + scale[a] * h[t, s, :r] @ B_s_T.view(r, n).float()).to(y.dtype)
    """
    # (1) check
    if h.dim() != 3 or h.dtype != torch.float32:
        raise TypeError(f"h must be a float32 (T, n_slices, R) tensor, got {h.dtype} {tuple(h.shape)}")
    T, n_slices, max_rank = h.shape
    if y.dim() != 2 or y.shape[0] != T:
        raise ValueError(f"y must be ({T}, d_out), got {tuple(y.shape)}")
    if y.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"y dtype {y.dtype} not supported")
    meta = {"b_offset": b_offset, "rank": rank, "out_start": out_start, "out_len": out_len}
    check_lora_args(pool, page_table, idx, meta, T, n_slices, {"h": h, "scale": scale, "y": y})
    if scale.shape != (page_table.shape[0],):
        raise ValueError(f"scale must be ({page_table.shape[0]},), got {tuple(scale.shape)}")
    if T == 0 or n_slices == 0 or max_rank == 0 or y.shape[1] == 0:
        return y
    config = config or expand_config(T, y.shape[1], max_rank, y.device, segments)
    if config.split_k != 1:
        raise ValueError(f"{config}: the expand does not split its reduction")
    segments = resolve_segments(segments, idx, config, page_table.shape[0])

    # (2) no allocation: y is the output. (3) launch; column tiles cover d_out,
    # an upper bound of every out_len known without reading it back.
    grid_m, idx_arg, order_arg, tile_arg = launch_rows(T, segments, idx)
    grid = (grid_m, n_slices, triton.cdiv(y.shape[1], config.block_n))
    mma_name, dot_f32 = mma_kind(y.device, config)
    _expand_kernel[grid](
        h, pool, page_table, idx_arg, order_arg, tile_arg,
        b_offset, rank, out_start, out_len, scale, y,
        T,
        h.stride(0), h.stride(1), h.stride(2),
        pool.stride(0), pool.stride(1),
        page_table.stride(0), page_table.stride(1),
        b_offset.stride(0), b_offset.stride(1),
        rank.stride(0), rank.stride(1),
        out_start.stride(0), out_start.stride(1),
        out_len.stride(0), out_len.stride(1),
        y.stride(0), y.stride(1),
        PAGE=pool.shape[1], SORTED=config.sorted,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        MMA=mma_name, DOT_F32=dot_f32, num_warps=config.num_warps,
    )
    return y
