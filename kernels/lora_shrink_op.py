"""Triton LoRA shrink over the paged pool: h = x @ A_s.T per token row and slice.

Semantics are `kernels.lora_ref.lora_shrink_ref`'s exactly; this module also
holds what the shrink and expand kernels share: the batch layout (`Segments`,
`lora_segments`), the tile configuration (`TileConfig`), the argument checks
and the in-kernel helpers that find a program's rows and read paged weights.

Weights are read in place: virtual element v of slot a is loaded from
`pool[page_table[a, v // P], v % P]`, one address per element, so adapters
may sit on any pages in any order and rows of A may straddle pages.

Two launch shapes, chosen per call (`TileConfig.sorted`):
- rows (decode, S-LoRA MBGMV / vLLM bgmv): one program per token row x slice
  x rank tile (x split of d_in); a GEMV with `tl.sum`, no sort, no metadata.
- sorted (prefill, Punica SGMV): rows grouped by slot (`lora_segments`), one
  program per tile of `block_m` rows of ONE slot x slice x rank tile, so each
  weight tile is loaded once per row tile and multiplied with `tl.dot`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Largest batch served one program per row when no `segments` are given;
# above it, sorting rows by slot pays for itself. A guess to tune on a GPU.
ROWS_MAX_T = 16


@dataclass(frozen=True)
class TileConfig:
    """How one launch tiles the work. Shrink: n = rank, k = d_in; expand: n = out columns, k = rank."""

    sorted: bool       # rows grouped by slot in tiles of block_m (SGMV); else one program per row
    block_m: int       # token rows per program (1 unless sorted)
    block_n: int       # output columns per program
    block_k: int       # reduction elements per loop step
    split_k: int = 1   # shrink only: programs sharing one reduction, summed with fp32 atomics
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "split_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"TileConfig.{name}={v} must be a power of two")
        if not self.sorted and self.block_m != 1:
            raise ValueError("TileConfig.block_m must be 1 when rows are not sorted")


@dataclass(frozen=True)
class Segments:
    """A batch's token rows grouped by adapter slot, cut into tiles of `block_m`
    rows of one slot each. Depends only on `idx`: compute it once per batch
    and pass it to every shrink/expand of that batch."""

    order: Tensor       # (T,) int64; order[p] is the token row at sorted position p (stable)
    sorted_idx: Tensor  # (T,) int32; idx[order], so rows of one slot are contiguous
    tile_start: Tensor  # (max_tiles,) int32; first sorted position of tile i, T where there is no tile i
    block_m: int        # rows per tile


def lora_segments(idx: Tensor, block_m: int = 16, num_slots: int | None = None) -> Segments:
    """Group rows by slot without a host sync (grid sizes come from bounds).

    Every run of equal sorted_idx is cut into tiles of at most block_m rows;
    there are at most cdiv(T, block_m) + num_slots such tiles (and at most T).
    """
    T = idx.numel()
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two")
    order = torch.argsort(idx, stable=True)  # (T,)
    sorted_idx = idx[order].to(torch.int32)  # (T,)
    pos = torch.arange(T, device=idx.device)  # (T,)
    new_run = torch.ones(T, dtype=torch.bool, device=idx.device)
    new_run[1:] = sorted_idx[1:] != sorted_idx[:-1]
    run_start = torch.cummax(torch.where(new_run, pos, 0), 0).values  # (T,) start of each row's run
    is_tile = (pos - run_start) % block_m == 0  # (T,)
    bound = T if num_slots is None else min(T, triton.cdiv(T, block_m) + num_slots)
    tile_id = torch.cumsum(is_tile, 0) - 1  # (T,)
    # Non-starting rows scatter into a spare last entry, dropped after.
    tile_start = torch.full((bound + 1,), T, dtype=torch.int32, device=idx.device)
    tile_start.scatter_(0, torch.where(is_tile, tile_id, bound), pos.to(torch.int32))
    return Segments(order, sorted_idx, tile_start[:bound], block_m)


def is_interpreted(device: torch.device) -> bool:
    """Triton runs on non-CUDA tensors only under its interpreter."""
    return device.type != "cuda"


def check_lora_args(pool: Tensor, page_table: Tensor, idx: Tensor, meta: dict[str, Tensor],
                    T: int, n_slices: int, batch: dict[str, Tensor]) -> None:
    """Shapes, dtypes and devices shared by shrink and expand (ValueError/TypeError), and
    that Triton can run on them at all (RuntimeError). Reads nothing back from the GPU."""
    device = pool.device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton LoRA kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
                           "before the kernel modules are imported")
    for name, t in {**batch, "page_table": page_table, "idx": idx, **meta}.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, pool on {device}")
    if pool.dim() != 2:
        raise ValueError(f"pool must be (num_pages, P), got {tuple(pool.shape)}")
    if pool.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"pool dtype {pool.dtype} not supported")
    S = page_table.shape[0]
    if page_table.dim() != 2 or page_table.is_floating_point():
        raise TypeError(f"page_table must be an integer (S, max_pages) tensor, got {page_table.dtype} "
                        f"{tuple(page_table.shape)}")
    if idx.shape != (T,) or idx.is_floating_point():
        raise TypeError(f"idx must be an integer ({T},) tensor, got {idx.dtype} {tuple(idx.shape)}")
    for name, t in meta.items():
        if t.shape != (S, n_slices) or t.is_floating_point():
            raise TypeError(f"{name} must be an integer ({S}, {n_slices}) tensor, got {t.dtype} {tuple(t.shape)}")
    # Virtual element ids are int32 in the kernels; a slot's buffer is far smaller.
    if page_table.shape[1] * pool.shape[1] >= 2**31:
        raise ValueError("a slot's virtual buffer must hold fewer than 2**31 elements")


def resolve_segments(segments: Segments | None, idx: Tensor, config: TileConfig,
                     num_slots: int) -> Segments | None:
    """The segments a launch with `config` reads: the given ones, else computed
    here for a sorted config, else None. Checks they fit the batch and config."""
    if config.sorted and not is_interpreted(idx.device) and min(config.block_m, config.block_n,
                                                                config.block_k) < 16:
        raise ValueError(f"{config}: tl.dot on a GPU needs blocks of at least 16")
    if segments is None:
        return lora_segments(idx, config.block_m, num_slots) if config.sorted else None
    if segments.order.shape != idx.shape or segments.order.device != idx.device:
        raise ValueError("segments were computed for another batch")
    if not config.sorted or config.block_m != segments.block_m:
        raise ValueError(f"segments of block_m={segments.block_m} need a sorted config with that block_m, "
                         f"got {config}")
    return segments


def mma_kind(device: torch.device, config: TileConfig) -> tuple[str, bool]:
    """(MMA, DOT_F32) meta-parameters: tensor cores for sorted tiles on a GPU;
    fp32 operands under the interpreter, whose 16-bit tl.dot is wrong (triton 3.9)."""
    return ("dot" if config.sorted else "sum"), is_interpreted(device)


def launch_rows(T: int, segments: Segments | None, idx: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
    """Grid dim 0 and the (idx, order, tile_start) pointers the kernels read."""
    if segments is None:
        return T, idx, idx, idx  # order/tile_start unused when not sorted
    return segments.tile_start.numel(), segments.sorted_idx, segments.order, segments.tile_start


@triton.jit
def program_rows(idx_ptr, order_ptr, tile_start_ptr, T,
                 SORTED: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's token rows (BLOCK_M,) int64, their mask, and their slot a (-1: none).

    Sorted: idx_ptr is sorted_idx, and the tile is the rows from tile_start[pid]
    on that share its slot (at most BLOCK_M). Else: row pid alone."""
    pid = tl.program_id(0)
    if SORTED:
        start = tl.load(tile_start_ptr + pid)
        p = start + tl.arange(0, BLOCK_M)  # sorted positions
        in_batch = p < T
        a = tl.load(idx_ptr + tl.minimum(start, T - 1))
        row_mask = in_batch & (tl.load(idx_ptr + p, mask=in_batch, other=-2) == a)
        tok = tl.load(order_ptr + p, mask=row_mask, other=0).to(tl.int64)
        a = tl.where(start < T, a, -1)
    else:
        tok = (pid + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = tok < T
        a = tl.load(idx_ptr + pid).to(tl.int32)
    return tok, row_mask, a


@triton.jit
def load_paged(pool_ptr, pages_ptr, v, mask,
               stride_pt_page, stride_pool_page, stride_pool_elem, PAGE: tl.constexpr):
    """pool[pages[v // PAGE], v % PAGE] for int32 virtual element ids v; 0 where not mask."""
    page = tl.load(pages_ptr + (v // PAGE) * stride_pt_page, mask=mask, other=0)
    return tl.load(pool_ptr + page.to(tl.int64) * stride_pool_page + (v % PAGE) * stride_pool_elem,
                   mask=mask, other=0.0)


@triton.jit
def mma(acc, a, b, MMA: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ b accumulated in fp32; a (M, K), b (K, N).

    "sum": broadcast-multiply-reduce (GEMV-shaped tiles, any sizes);
    "dot": tl.dot on operands cast to b's dtype (to fp32 if DOT_F32), sizes >= 16 on GPUs."""
    if MMA == "sum":
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    elif DOT_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision="ieee")
    return acc


@triton.jit
def _shrink_kernel(
    # pointers
    x_ptr, pool_ptr, page_table_ptr, idx_ptr, order_ptr, tile_start_ptr,
    a_offset_ptr, rank_ptr, h_ptr,
    # sizes
    T, d_in, max_rank,
    # strides
    stride_xt, stride_xk,
    stride_pool_page, stride_pool_elem,
    stride_pt_slot, stride_pt_page,
    stride_off_slot, stride_off_slice,
    stride_rank_slot, stride_rank_slice,
    stride_ht, stride_hs, stride_hr,
    # meta-parameters
    PAGE: tl.constexpr, SORTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    MMA: tl.constexpr, DOT_F32: tl.constexpr,
):
    """h[tok, s, n] = sum_k x[tok, k] * A_s[n, k] for this program's rows, slice s
    and rank tile n; zeros where the slot is -1 or n >= rank (or, with SPLIT_K > 1,
    atomically added partial sums into a zeroed h)."""
    tok, row_mask, a = program_rows(idx_ptr, order_ptr, tile_start_ptr, T, SORTED, BLOCK_M)
    s = tl.program_id(1)
    pid_n = tl.program_id(2) // SPLIT_K
    pid_k = tl.program_id(2) % SPLIT_K

    a_safe = tl.maximum(a, 0)
    rank = tl.load(rank_ptr + a_safe * stride_rank_slot + s * stride_rank_slice)
    rank = tl.where(a >= 0, rank, 0)
    off = tl.load(a_offset_ptr + a_safe * stride_off_slot + s * stride_off_slice).to(tl.int32)
    pages_ptr = page_table_ptr + a_safe.to(tl.int64) * stride_pt_slot

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of A_s = columns of h
    n_mask = n < rank
    # Inactive programs (no slot, tile past the rank) run no iterations and store zeros.
    k_end = tl.where(pid_n * BLOCK_N < rank, d_in, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, k_end, BLOCK_K * SPLIT_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < d_in
        x = tl.load(x_ptr + tok[:, None] * stride_xt + k[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        v = off + n[None, :] * d_in + k[:, None]  # (BLOCK_K, BLOCK_N) virtual ids of A_s^T
        w = load_paged(pool_ptr, pages_ptr, v, n_mask[None, :] & k_mask[:, None],
                       stride_pt_page, stride_pool_page, stride_pool_elem, PAGE)
        acc = mma(acc, x, w, MMA, DOT_F32)

    h_ptrs = h_ptr + tok[:, None] * stride_ht + s * stride_hs + n[None, :] * stride_hr
    h_mask = row_mask[:, None] & (n[None, :] < max_rank)
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=h_mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=h_mask & n_mask[None, :], sem="relaxed")


@functools.lru_cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def sorted_block_m(T: int, segments: Segments | None) -> int | None:
    """Rows per program of a sorted launch (the segments' if given), None for one program per row."""
    if segments is not None:
        return segments.block_m
    if T > ROWS_MAX_T:
        return 16 if T <= 256 else 64
    return None


def shrink_config(T: int, d_in: int, n_slices: int, max_rank: int, device: torch.device,
                  segments: Segments | None = None) -> TileConfig:
    """Default tiling. Interpreter: few, large programs (each costs milliseconds).
    GPU: sorted tiles above ROWS_MAX_T rows or when segments are given; split
    d_in while the grid is too small to fill the GPU (decode of a few tokens)."""
    r_block = triton.next_power_of_2(max_rank)
    block_m = sorted_block_m(T, segments)
    if is_interpreted(device):
        return TileConfig(sorted=block_m is not None, block_m=block_m or 1,
                          block_n=r_block, block_k=min(64, triton.next_power_of_2(d_in)))
    if block_m is not None:
        return TileConfig(sorted=True, block_m=block_m, block_n=max(16, min(r_block, 64)), block_k=64)
    block_n = min(r_block, 32)
    block_k = 256
    programs = T * n_slices * triton.cdiv(max_rank, block_n)
    target = 2 * _sm_count(device.index)
    split_k = 1
    while programs * split_k < target and block_k * split_k * 2 <= d_in and split_k < 32:
        split_k *= 2
    return TileConfig(sorted=False, block_m=1, block_n=block_n, block_k=block_k, split_k=split_k)


def lora_shrink(
    x: Tensor,           # (T, d_in) activations
    pool: Tensor,        # (num_pages, P) one layer of the unified pool, x's dtype
    page_table: Tensor,  # (S, max_pages) int32 physical page ids per slot
    idx: Tensor,         # (T,) int32 slot per token row, -1 = no adapter
    a_offset: Tensor,    # (S, n_slices) int64 virtual offset of A_s
    rank: Tensor,        # (S, n_slices) int32 rows of A_s (0 = slice absent), each <= max_rank
    max_rank: int,       # R, width of the output
    *,
    segments: Segments | None = None,  # from lora_segments(idx, ...), reused across layers
    config: TileConfig | None = None,  # override the default tiling (tests, tuning)
) -> Tensor:             # (T, n_slices, R) float32
    """Per token row t with a = idx[t] >= 0, for every slice s, one launch:

        A_s = pool[page_table[a, v // P], v % P] for v in a_offset[a, s] + arange(rank[a, s] * d_in)
        h[t, s, :rank[a, s]] = x[t].float() @ A_s.view(rank[a, s], d_in).float().T
        h[t, s, rank[a, s]:] = 0;  h[t] = 0 where idx[t] == -1
    """
    # (1) check
    if x.dim() != 2:
        raise ValueError(f"x must be (T, d_in), got {tuple(x.shape)}")
    T, d_in = x.shape
    n_slices = a_offset.shape[1] if a_offset.dim() == 2 else -1
    check_lora_args(pool, page_table, idx, {"a_offset": a_offset, "rank": rank}, T, n_slices, {"x": x})
    if x.dtype != pool.dtype:
        raise TypeError(f"x dtype {x.dtype} differs from pool dtype {pool.dtype}")
    if max_rank < 0:
        raise ValueError(f"max_rank={max_rank} must be >= 0")
    if T == 0 or n_slices == 0 or max_rank == 0:
        return torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
    config = config or shrink_config(T, d_in, n_slices, max_rank, x.device, segments)
    segments = resolve_segments(segments, idx, config, page_table.shape[0])

    # (2) allocate: split-K programs add into zeros; otherwise every element is stored once
    alloc = torch.zeros if config.split_k > 1 else torch.empty
    h = alloc((T, n_slices, max_rank), dtype=torch.float32, device=x.device)  # (T, n_slices, R)

    # (3) launch
    grid_m, idx_arg, order_arg, tile_arg = launch_rows(T, segments, idx)
    grid = (grid_m, n_slices, triton.cdiv(max_rank, config.block_n) * config.split_k)
    mma_name, dot_f32 = mma_kind(x.device, config)
    _shrink_kernel[grid](
        x, pool, page_table, idx_arg, order_arg, tile_arg, a_offset, rank, h,
        T, d_in, max_rank,
        x.stride(0), x.stride(1),
        pool.stride(0), pool.stride(1),
        page_table.stride(0), page_table.stride(1),
        a_offset.stride(0), a_offset.stride(1),
        rank.stride(0), rank.stride(1),
        h.stride(0), h.stride(1), h.stride(2),
        PAGE=pool.shape[1], SORTED=config.sorted,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        MMA=mma_name, DOT_F32=dot_f32, num_warps=config.num_warps,
    )
    return h
