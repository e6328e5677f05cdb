"""Paged LoRA kernels: Triton vs the torch reference, the reference vs dense
math on unpaged weights, the backend dispatch, and the benchmark's smoke run.

Inputs are seeded random (never zeros); adapters have mixed ranks {1, 3, 8, 16}
and absent slices; each slot's slices write their own column order of y;
pages are a random permutation of the pool with garbage pages between, and
the page size divides no row, so rows straddle pages. Without a GPU the Triton
cases run under TRITON_INTERPRET=1 (set in conftest) on tiny shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from bdlora_ray import kernels
from bdlora_ray.kernels.lora_ref import lora_expand_ref, lora_shrink_ref, read_paged
from bdlora_ray.kernels.lora_torch import lora_expand_torch, lora_shrink_torch

ROOT = Path(__file__).resolve().parent.parent
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs "
                                                 "TRITON_INTERPRET=1, set by conftest only without a GPU")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="no CUDA GPU")]),
]
DTYPES = [torch.float32, torch.bfloat16]

# Slot x slice ranks: all of {1, 3, 8, 16}, absent slices (0), and slot 3 with none at all.
RANKS = [[1, 3, 8], [16, 0, 3], [8, 16, 1], [0, 0, 0], [3, 1, 16]]
OUT_LENS = (17, 5, 9)  # per slice, e.g. q, k, v of a merged QKV; y has 3 more columns no slice writes
MAX_RANK = 16
BATCHES = {
    "decode": [4, 0, -1, 2, 1, 3],                             # one token per adapter, a row without one
    "prefill": [2, 0, 2, -1, 4, 0, 2, 1, -1, 0, 2, 4],         # several tokens per adapter, unsorted
}


@dataclass
class Case:
    """A batch, its paged pool, and the same weights unpaged (as float32)."""

    x: Tensor           # (T, d_in)
    y: Tensor           # (T, d_out)
    pool: Tensor        # (num_pages, P)
    page_table: Tensor  # (S, max_pages) int32
    idx: Tensor         # (T,) int32
    a_offset: Tensor    # (S, n_slices) int64
    b_offset: Tensor    # (S, n_slices) int64
    rank: Tensor        # (S, n_slices) int32
    out_start: Tensor   # (S, n_slices) int32
    out_len: Tensor     # (S, n_slices) int32
    scale: Tensor       # (S,) float32
    A: dict             # (a, s) -> (rank, d_in) float32
    B: dict             # (a, s) -> (out_len, rank) float32

    def paged(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.pool, self.page_table, self.idx


def make_case(idx: list[int], d_in: int = 33, out_lens: tuple[int, ...] = OUT_LENS, ranks=RANKS,
              page: int = 7, dtype=torch.float32, device: str = "cpu", seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    rank = torch.tensor(ranks, dtype=torch.int32)
    S, n = rank.shape
    a_offset = torch.zeros(S, n, dtype=torch.int64)
    b_offset = torch.zeros(S, n, dtype=torch.int64)
    out_start = torch.zeros(S, n, dtype=torch.int32)
    out_len = torch.zeros(S, n, dtype=torch.int32)
    A, B, buffers = {}, {}, []
    for a in range(S):
        col, cursor, chunks = 0, int(torch.randint(page, (1,), generator=g)), []  # start mid-page
        for s in torch.randperm(n, generator=g).tolist():  # this slot's column order of the slices
            out_start[a, s] = col
            col += out_lens[s]
        for s in range(n):
            r = int(rank[a, s])
            L = out_lens[s] - 4 * (a % 2 and s == 0)  # odd slots write only part of slice 0's range
            out_len[a, s] = L
            A[a, s] = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(dtype).float()
            B[a, s] = (torch.randn(L, r, generator=g) / max(r, 1)**0.5).to(dtype).float()
            gap = int(torch.randint(3, (1,), generator=g))
            a_offset[a, s], b_offset[a, s] = cursor, cursor + r * d_in + gap
            chunks += [torch.randn(cursor - sum(c.numel() for c in chunks), generator=g),
                       A[a, s].flatten(), torch.randn(gap, generator=g), B[a, s].T.flatten()]  # B stored as B.T
            cursor = int(b_offset[a, s]) + L * r
        buffers.append(torch.cat(chunks))
    max_pages = max(-(-b.numel() // page) for b in buffers)
    num_pages = S * max_pages + 5  # spare pages of garbage a wrong address would read
    page_table = torch.randperm(num_pages, generator=g)[: S * max_pages].view(S, max_pages).to(torch.int32)
    pool = torch.randn(num_pages, page, generator=g)
    for a, buf in enumerate(buffers):
        padded = torch.randn(max_pages * page, generator=g)
        padded[: buf.numel()] = buf
        pool[page_table[a].long()] = padded.view(max_pages, page)
    T = len(idx)
    x = torch.randn(T, d_in, generator=g)
    y = torch.randn(T, sum(out_lens) + 3, generator=g)
    scale = torch.rand(S, generator=g) + 0.5
    to = lambda t, dt=None: t.to(device=device, dtype=dt or t.dtype)  # noqa: E731
    return Case(to(x, dtype), to(y, dtype), to(pool, dtype), to(page_table), to(torch.tensor(idx, dtype=torch.int32)),
                to(a_offset), to(b_offset), to(rank), to(out_start), to(out_len), to(scale), A, B)


def dense_lora(c: Case) -> tuple[Tensor, Tensor]:
    """(h, y) in float64 straight from the unpaged weights, row by row."""
    T = c.x.shape[0]
    h = torch.zeros(T, c.rank.shape[1], MAX_RANK, dtype=torch.float64)
    y = c.y.cpu().double().clone()
    for t, a in enumerate(c.idx.tolist()):
        for s in range(c.rank.shape[1]):
            r = int(c.rank[a, s]) if a >= 0 else 0
            if r == 0:
                continue
            h[t, s, :r] = c.A[a, s].double() @ c.x[t].cpu().double()
            o, L = int(c.out_start[a, s]), int(c.out_len[a, s])
            y[t, o:o + L] += float(c.scale[a]) * (c.B[a, s].double() @ h[t, s, :r])
    return h, y


def tol(dtype: torch.dtype) -> dict:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


def tile_config(name: str, device: str):
    """Launch shapes to cover: the default, one program per row (split or not), sorted tiles.
    Under the interpreter blocks are small so that every mask matters; tl.dot on GPUs needs >= 16."""
    from bdlora_ray.kernels.lora_shrink_op import TileConfig

    small = device == "cpu"
    return {
        "default": None,
        "rows": TileConfig(sorted=False, block_m=1, block_n=8 if small else 16, block_k=16 if small else 32),
        "rows_split_k": TileConfig(sorted=False, block_m=1, block_n=8 if small else 16, block_k=16, split_k=2),
        "sorted": TileConfig(sorted=True, block_m=2 if small else 16, block_n=8 if small else 16,
                             block_k=16),
    }[name]


# --- the reference itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_dense_math(dtype):
    """lora_ref on pages equals plain matmuls on the unpaged weights, at d_in = out_len = 2049."""
    c = make_case([1, -1, 4, 0, 1, 3, 2], d_in=2049, out_lens=(2049, 17, 9), page=1000, dtype=dtype)
    for (a, s), A in c.A.items():  # the paged layout holds what make_case meant it to
        assert torch.equal(read_paged(c.pool, c.page_table[a], int(c.a_offset[a, s]), *A.shape).float(), A)
    h_dense, y_dense = dense_lora(c)
    h = lora_shrink_ref(c.x, *c.paged(), c.a_offset, c.rank, MAX_RANK)
    torch.testing.assert_close(h.double(), h_dense, **tol(dtype))
    y = lora_expand_ref(h_dense.float(), *c.paged(), c.b_offset, c.rank, c.out_start, c.out_len, c.scale,
                        c.y.clone())
    torch.testing.assert_close(y.double(), y_dense, **tol(dtype))
    assert torch.equal(y[1], c.y[1]) and torch.equal(y[5], c.y[5])  # no adapter / no slices
    assert torch.equal(y[:, -3:], c.y[:, -3:])  # columns no slice writes


# --- vectorised torch (the CPU serving path) vs reference -------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_vectorised_torch_matches_reference(dtype, batch):
    c = make_case(BATCHES[batch], dtype=dtype, seed=4)
    h = lora_shrink_torch(c.x, *c.paged(), c.a_offset, c.rank, MAX_RANK)
    h_ref = lora_shrink_ref(c.x, *c.paged(), c.a_offset, c.rank, MAX_RANK)
    torch.testing.assert_close(h, h_ref, **tol(dtype))
    assert h_ref.abs().sum() > 0
    for t, a in enumerate(c.idx.tolist()):  # exactly zero past each slice's rank and for rows with no adapter
        for s in range(3):
            r = int(c.rank[a, s]) if a >= 0 else 0
            assert torch.equal(h[t, s, r:], torch.zeros_like(h[t, s, r:]))
    y = lora_expand_torch(h_ref, *c.paged(), c.b_offset, c.rank, c.out_start, c.out_len, c.scale, c.y.clone())
    y_ref = lora_expand_ref(h_ref, *c.paged(), c.b_offset, c.rank, c.out_start, c.out_len, c.scale, c.y.clone())
    torch.testing.assert_close(y, y_ref, **tol(dtype))
    untouched = (c.idx == -1) | (c.idx == 3)
    assert untouched.any() and torch.equal(y[untouched], c.y[untouched])
    assert torch.equal(y[:, -3:], c.y[:, -3:])


def test_vectorised_torch_matches_dense_math_at_2049():
    c = make_case([1, -1, 4, 0, 1, 3, 2], d_in=2049, out_lens=(2049, 17, 9), page=1000, dtype=torch.float32)
    h_dense, y_dense = dense_lora(c)
    h = lora_shrink_torch(c.x, *c.paged(), c.a_offset, c.rank, MAX_RANK)
    torch.testing.assert_close(h.double(), h_dense, **tol(torch.float32))
    y = lora_expand_torch(h, *c.paged(), c.b_offset, c.rank, c.out_start, c.out_len, c.scale, c.y.clone())
    torch.testing.assert_close(y.double(), y_dense, **tol(torch.float32))
    assert torch.equal(y[1], c.y[1]) and torch.equal(y[5], c.y[5])


# --- triton vs reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("config", ["default", "rows", "rows_split_k", "sorted"])
def test_shrink_matches_reference(device, dtype, batch, config):
    from bdlora_ray.kernels.lora_shrink_op import lora_shrink

    c = make_case(BATCHES[batch], dtype=dtype, device=device, seed=1)
    h = lora_shrink(c.x, *c.paged(), c.a_offset, c.rank, MAX_RANK, config=tile_config(config, device))
    h_ref = lora_shrink_ref(c.x, *c.paged(), c.a_offset, c.rank, MAX_RANK)
    assert h.shape == (len(BATCHES[batch]), 3, MAX_RANK) and h.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, **tol(dtype))
    assert h_ref.abs().sum() > 0
    no_adapter = c.idx == -1
    assert torch.equal(h[no_adapter], torch.zeros_like(h[no_adapter]))
    for t, a in enumerate(c.idx.tolist()):  # zero past each slice's rank, not merely close
        for s in range(3):
            r = int(c.rank[a, s]) if a >= 0 else 0
            assert torch.equal(h[t, s, r:], torch.zeros_like(h[t, s, r:]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("config", ["default", "rows", "sorted"])
def test_expand_matches_reference(device, dtype, batch, config):
    from bdlora_ray.kernels.lora_expand_op import lora_expand

    c = make_case(BATCHES[batch], dtype=dtype, device=device, seed=2)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(c.x.shape[0], 3, MAX_RANK, generator=g).to(device)  # garbage past the ranks is ignored
    y = c.y.clone()
    out = lora_expand(h, *c.paged(), c.b_offset, c.rank, c.out_start, c.out_len, c.scale, y,
                      config=tile_config(config, device))
    assert out is y
    y_ref = lora_expand_ref(h, *c.paged(), c.b_offset, c.rank, c.out_start, c.out_len, c.scale, c.y.clone())
    torch.testing.assert_close(y, y_ref, **tol(dtype))
    assert not torch.equal(y_ref, c.y)
    untouched = (c.idx == -1) | (c.idx == 3)  # no adapter; an adapter with every slice at rank 0
    assert untouched.any() and torch.equal(y[untouched], c.y[untouched])
    assert torch.equal(y[:, -3:], c.y[:, -3:])


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_with_shared_segments_matches_dense(device):
    """The model's path: shrink then expand through `kernels`, one Segments for both."""
    c = make_case(BATCHES["prefill"], device=device, seed=4)
    seg = kernels.lora_segments(c.idx, num_slots=c.page_table.shape[0])
    h = kernels.lora_shrink(c.x, *c.paged(), c.a_offset, c.rank, MAX_RANK, backend="triton", segments=seg)
    y = kernels.lora_expand(h, *c.paged(), c.b_offset, c.rank, c.out_start, c.out_len, c.scale, c.y.clone(),
                            backend="triton", segments=seg)
    h_dense, y_dense = dense_lora(c)
    torch.testing.assert_close(h.cpu().double(), h_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.cpu().double(), y_dense, atol=1e-5, rtol=1e-5)


def test_segments_tile_every_row_once_by_slot():
    from bdlora_ray.kernels.lora_shrink_op import lora_segments

    idx = torch.tensor([2, 0, 2, -1, 4, 0, 2, 1, -1, 0, 2, 4, 2, 2], dtype=torch.int32)
    seg = lora_segments(idx, block_m=2, num_slots=5)
    T = idx.numel()
    assert torch.equal(seg.sorted_idx, idx[seg.order])
    assert torch.equal(torch.sort(seg.order).values, torch.arange(T))
    starts = seg.tile_start[seg.tile_start < T].tolist()
    counts = torch.unique(idx, return_counts=True)[1]
    assert len(starts) == int((-(-counts // 2)).sum()) <= seg.tile_start.numel()  # ceil(rows / block_m) per slot
    covered = []
    for st in starts:  # what the kernels do: rows from st on with the same slot, at most block_m
        rows = [p for p in range(st, min(st + 2, T)) if seg.sorted_idx[p] == seg.sorted_idx[st]]
        covered += rows
    assert sorted(covered) == list(range(T))


# --- dispatch ---------------------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    c = make_case(BATCHES["decode"], seed=5)
    assert kernels.resolve_backend(None, c.x) in ("torch", "triton")
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    kernels.set_backend(None)
    assert kernels.resolve_backend(None, c.x) == "torch"  # CPU tensors, auto
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.resolve_backend(None, c.x) == "triton"
    kernels.set_backend("torch")  # wins over the env var
    try:
        assert kernels.resolve_backend(None, c.x) == "torch"
        assert kernels.resolve_backend("triton", c.x) == "triton"  # the call's keyword wins over both
        with pytest.raises(ValueError, match="unknown kernel backend"):
            kernels.set_backend("cuda")
        with pytest.raises(ValueError, match="unknown kernel backend"):
            kernels.lora_shrink(c.x, *c.paged(), c.a_offset, c.rank, MAX_RANK, backend="tirton")
    finally:
        kernels.set_backend(None)
    monkeypatch.setenv(kernels.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.get_backend()


@pytest.mark.skipif(not INTERPRETED, reason="forcing triton on CPU tensors needs TRITON_INTERPRET=1")
def test_forced_triton_equals_torch_backend(monkeypatch):
    """backend="triton" runs the Triton kernels (and only it does), and both backends equal the reference."""
    import bdlora_ray.kernels.lora_expand_op as expand_op
    import bdlora_ray.kernels.lora_shrink_op as shrink_op

    triton_calls: list[str] = []
    for module, name in ((shrink_op, "lora_shrink"), (expand_op, "lora_expand")):
        def spy(*args, _real=getattr(module, name), _name=name, **kw):
            triton_calls.append(_name)
            return _real(*args, **kw)
        monkeypatch.setattr(module, name, spy)
    c = make_case(BATCHES["decode"], seed=6)
    outs = {}
    for backend in ("reference", "torch", "triton"):
        before = len(triton_calls)
        h = kernels.lora_shrink(c.x, *c.paged(), c.a_offset, c.rank, MAX_RANK, backend=backend)
        y = kernels.lora_expand(h, *c.paged(), c.b_offset, c.rank, c.out_start, c.out_len, c.scale, c.y.clone(),
                                backend=backend)
        assert triton_calls[before:] == (["lora_shrink", "lora_expand"] if backend == "triton" else []), backend
        outs[backend] = (h, y)
    assert not torch.equal(outs["reference"][1], c.y)  # the adapters changed y: the comparison means something
    for backend in ("torch", "triton"):
        for got, want in zip(outs[backend], outs["reference"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_import_is_lazy():
    """Importing `kernels` imports neither Triton nor the Triton kernel modules."""
    code = ("import sys; from bdlora_ray import kernels; bad = [m for m in sys.modules if m == 'triton' or"
            " m.endswith('_op') and m.startswith('bdlora_ray.kernels.')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_bad_arguments_raise():
    from bdlora_ray.kernels.lora_expand_op import lora_expand
    from bdlora_ray.kernels.lora_shrink_op import TileConfig, lora_shrink

    c = make_case(BATCHES["decode"], seed=7)
    with pytest.raises(TypeError, match="dtype"):
        lora_shrink(c.x.double(), *c.paged(), c.a_offset, c.rank, MAX_RANK)
    with pytest.raises(TypeError, match="rank"):
        lora_shrink(c.x, *c.paged(), c.a_offset, c.rank[:, :2], MAX_RANK)
    with pytest.raises(ValueError, match="y must be"):
        lora_expand(torch.zeros(2, 3, MAX_RANK), *c.paged(), c.b_offset, c.rank, c.out_start, c.out_len,
                    c.scale, c.y)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(sorted=True, block_m=3, block_n=16, block_k=16)


# --- benchmark script -------------------------------------------------------------------------------


@pytest.mark.skipif(not INTERPRETED, reason="the cpu smoke run needs TRITON_INTERPRET=1")
def test_bench_tiny_cpu_smoke(tmp_path, monkeypatch):
    from bench import kernels as bench
    out = tmp_path / "k.json"
    assert bench.main(["--device", "cpu", "--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["shrink_triton_us"] > 0 and r["expand_GBps"] > 0 for r in rows)
    if not torch.cuda.is_available():
        assert bench.main(["--json", str(out)]) == 2  # the CUDA sweep refuses to run without a GPU
