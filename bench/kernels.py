"""Benchmark the paged LoRA shrink/expand kernels against the torch reference
and a dense `torch.bmm` over pre-gathered per-token weights.

Shapes are Llama-3.1-8B's per TP rank (BD-LoRA shards: a rank-r adapter has
rank r/TP on each rank), adapters of mixed ranks scattered over a pool of
512 slots. Prints a table and writes JSON. GB/s counts the bytes that must
move: the weights of the distinct adapters in the batch plus activations.

    python -m bench kernels                      # CUDA sweep -> bench/out/kernels.json
    python -m bench kernels --device cpu --tiny  # smoke run under the Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: its folder would shadow the `kernels` package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from torch import Tensor

log = logging.getLogger("bench.kernels")

LLAMA_8B = {"hidden": 4096, "q": 4096, "kv": 1024, "intermediate": 14336}


@dataclass(frozen=True)
class Sweep:
    tps: tuple[int, ...]
    layers: tuple[str, ...]
    batches: tuple[int, ...]
    adapters: tuple[int, ...]  # distinct adapters per batch (those > batch are skipped)
    ranks: tuple[int, ...]     # adapter ranks, mixed over slots; each shard has rank r / TP
    slots: int                 # adapters resident in the pool
    page: int                  # elements per page
    dtype: torch.dtype


FULL = Sweep(tps=(8, 1), layers=("qkv", "o", "gate_up", "down"), batches=(1, 16, 64, 256),
             adapters=(1, 16, 64, 256, 512), ranks=(8, 16, 32, 64), slots=512, page=4096,
             dtype=torch.bfloat16)
TINY = Sweep(tps=(1,), layers=("tiny",), batches=(3,), adapters=(1, 2), ranks=(2, 4), slots=4, page=10,
             dtype=torch.float32)


def layer_shape(layer: str, tp: int) -> tuple[int, tuple[int, ...]]:
    """(d_in, out_lens per slice) of one TP rank's shard of a layer."""
    h, q, kv, i = (LLAMA_8B[k] for k in ("hidden", "q", "kv", "intermediate"))
    return {
        "qkv": (h, (q // tp, kv // tp, kv // tp)),  # column-parallel, merged
        "o": (q // tp, (h,)),                         # row-parallel
        "gate_up": (h, (i // tp, i // tp)),           # column-parallel, merged
        "down": (i // tp, (h,)),                      # row-parallel
        "tiny": (33, (17, 5)),
    }[layer]


@dataclass
class Problem:
    """One layer's paged pool and slot tables, random contents (timing only)."""

    pool: Tensor        # (num_pages, P)
    page_table: Tensor  # (S, max_pages) int32, pages of a slot in random order
    a_offset: Tensor    # (S, n_slices) int64
    b_offset: Tensor    # (S, n_slices) int64
    rank: Tensor        # (S, n_slices) int32
    out_start: Tensor   # (S, n_slices) int32
    out_len: Tensor     # (S, n_slices) int32
    scale: Tensor       # (S,) float32
    max_rank: int


def make_problem(d_in: int, out_lens: tuple[int, ...], shard_ranks: list[int], page: int,
                 dtype: torch.dtype, device: str, gen: torch.Generator) -> Problem:
    S, n = len(shard_ranks), len(out_lens)
    rank = torch.tensor(shard_ranks, dtype=torch.int32)[:, None].expand(S, n).contiguous()  # (S, n)
    starts = torch.tensor([sum(out_lens[:s]) for s in range(n)], dtype=torch.int32)
    out_start = starts.expand(S, n).contiguous()
    out_len = torch.tensor(out_lens, dtype=torch.int32).expand(S, n).contiguous()
    a_numel = rank.long() * d_in                     # (S, n) A_s then B_s per slice, packed
    b_numel = rank.long() * out_len.long()
    sizes = torch.stack([a_numel, b_numel], 2).view(S, 2 * n)
    ends = sizes.cumsum(1)
    offsets = ends - sizes
    a_offset, b_offset = offsets[:, 0::2].contiguous(), offsets[:, 1::2].contiguous()
    pages = -(-ends[:, -1] // page)                  # (S,) pages each slot owns
    max_pages, num_pages = int(pages.max()), int(pages.sum())
    perm = torch.randperm(num_pages, generator=gen)
    page_table = torch.zeros(S, max_pages, dtype=torch.int32)
    first = 0
    for a in range(S):
        page_table[a, : pages[a]] = perm[first: first + pages[a]].to(torch.int32)
        first += int(pages[a])
    pool = (torch.randn(num_pages, page, generator=gen) * 0.02).to(dtype)
    scale = torch.rand(S, generator=gen) + 0.5
    to = lambda t: t.to(device)  # noqa: E731
    return Problem(to(pool), to(page_table), to(a_offset), to(b_offset), to(rank), to(out_start),
                   to(out_len), to(scale), max(shard_ranks))


def bench_time_us(fn, device: str) -> float:
    """Median microseconds: do_bench on CUDA; on CPU (interpreter) one warm and three timed runs."""
    if device == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, return_mode="median")
    fn()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(runs)


def run_case(p: Problem, d_in: int, out_lens: tuple[int, ...], T: int, n_adapters: int, dtype: torch.dtype,
             device: str, gen: torch.Generator, ref: bool) -> dict:
    from bdlora_ray.kernels import lora_expand, lora_shrink
    from bdlora_ray.kernels.lora_ref import lora_expand_ref, lora_shrink_ref

    S, n = p.rank.shape
    slots = torch.randperm(S, generator=gen)[:n_adapters]
    idx = slots[torch.randperm(T, generator=gen) % n_adapters].to(torch.int32).to(device)  # (T,) each slot >= 1 row
    x = torch.randn(T, d_in, generator=gen).to(dtype).to(device)         # (T, d_in)
    y = torch.randn(T, sum(out_lens), generator=gen).to(dtype).to(device)  # (T, d_out)
    args = (p.pool, p.page_table, idx)
    shrink = lambda: lora_shrink(x, *args, p.a_offset, p.rank, p.max_rank, backend="triton")  # noqa: E731
    h = shrink()                                                          # (T, n, R)
    expand = lambda: lora_expand(h, *args, p.b_offset, p.rank, p.out_start, p.out_len, p.scale, y,  # noqa: E731
                                 backend="triton")

    # Correctness once, so a fast wrong kernel cannot report a speed.
    h_ref = lora_shrink_ref(x, *args, p.a_offset, p.rank, p.max_rank)
    y_ref = lora_expand_ref(h_ref, *args, p.b_offset, p.rank, p.out_start, p.out_len, p.scale, y.clone())
    y_out = lora_expand(h, *args, p.b_offset, p.rank, p.out_start, p.out_len, p.scale, y.clone(),
                        backend="triton")
    err = {"shrink_max_err": (h - h_ref).abs().max().item(),
           "expand_max_err": (y_out.float() - y_ref.float()).abs().max().item()}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if (err["shrink_max_err"] > tol * (1 + h_ref.abs().max().item())
            or err["expand_max_err"] > tol * (1 + y_ref.float().abs().max().item())):
        raise RuntimeError(f"triton kernels disagree with the reference: {err} (T={T}, d_in={d_in})")

    # Dense baseline: per-token weights gathered ahead (not timed), one bmm per slice.
    ranks = p.rank[idx.long()]                                            # (T, n)
    R = p.max_rank
    # Values do not matter for timing; drawn on the device, as they can be GBs.
    A_g = torch.empty(n, T, R, d_in, dtype=dtype, device=device).normal_(0, 0.02)  # (n, T, R, d_in)
    B_g = [torch.empty(T, L, R, dtype=dtype, device=device).normal_(0, 0.02) for L in out_lens]  # (T, L_s, R)
    starts = [sum(out_lens[:s]) for s in range(n)]

    def bmm_shrink():
        return torch.stack([torch.bmm(A_g[s], x[:, :, None]) for s in range(n)], 1)  # (T, n, R, 1)

    h_dense = h.to(dtype)

    def bmm_expand():
        for s, (o, L) in enumerate(zip(starts, out_lens)):
            y[:, o:o + L] += torch.bmm(B_g[s], h_dense[:, s, :, None])[..., 0]

    elt = torch.finfo(dtype).bits // 8
    distinct = p.rank[slots.to(device).long()].long()                     # (n_adapters, n)
    w_a = int((distinct * d_in).sum()) * elt
    w_b = int((distinct * p.out_len[0].long()).sum()) * elt
    h_bytes = T * n * R * 4
    row = {"T": T, "adapters": n_adapters, "d_in": d_in, "out_lens": list(out_lens),
           "mean_shard_rank": float(ranks.float().mean()), **err,
           "shrink_bytes": w_a + T * d_in * elt + h_bytes,
           "expand_bytes": w_b + h_bytes + 2 * T * sum(out_lens) * elt}
    for kernel, fn, ref_fn, dense in (
        ("shrink", shrink, lambda: lora_shrink_ref(x, *args, p.a_offset, p.rank, R), bmm_shrink),
        ("expand", expand, lambda: lora_expand_ref(h, *args, p.b_offset, p.rank, p.out_start, p.out_len,
                                                   p.scale, y), bmm_expand),
    ):
        row[f"{kernel}_triton_us"] = bench_time_us(fn, device)
        row[f"{kernel}_ref_us"] = bench_time_us(ref_fn, device) if ref else None
        row[f"{kernel}_bmm_us"] = bench_time_us(dense, device)
        row[f"{kernel}_GBps"] = row[f"{kernel}_bytes"] / row[f"{kernel}_triton_us"] / 1e3
    return row


def format_row(r: dict) -> str:
    us = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    cols = [f"{r['tp']:>2}", f"{r['layer']:>7}", f"{r['T']:>4}", f"{r['adapters']:>4}"]
    for k in ("shrink", "expand"):
        cols += [f"{us(r[f'{k}_triton_us']):>9}", f"{us(r[f'{k}_ref_us']):>9}", f"{us(r[f'{k}_bmm_us']):>9}",
                 f"{r[f'{k}_GBps']:>7.1f}"]
    return " ".join(cols)


HEADER = (f"{'tp':>2} {'layer':>7} {'T':>4} {'ad':>4} "
          + " ".join(f"{k[0] + ' ' + c:>{w}}" for k in ("shrink", "expand")
                     for c, w in (("us", 9), ("ref us", 9), ("bmm us", 9), ("GB/s", 7))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the only sweep allowed on cpu)")
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "out" / "kernels.json")
    ap.add_argument("--no-ref", action="store_true", help="skip timing the (slow) torch reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.kernels: no CUDA GPU here; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    if args.device == "cpu":
        if not args.tiny:
            print("bench.kernels: --device cpu runs under the Triton interpreter; add --tiny", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
    sweep = TINY if args.tiny else FULL
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    print(HEADER)
    for tp in sweep.tps:
        for layer in sweep.layers:
            d_in, out_lens = layer_shape(layer, tp)
            shard_ranks = [max(1, sweep.ranks[i % len(sweep.ranks)] // tp) for i in range(sweep.slots)]
            p = make_problem(d_in, out_lens, shard_ranks, sweep.page, sweep.dtype, args.device, gen)
            for T in sweep.batches:
                for n_adapters in sweep.adapters:
                    if n_adapters > T:
                        continue
                    row = {"tp": tp, "layer": layer,
                           **run_case(p, d_in, out_lens, T, n_adapters, sweep.dtype, args.device, gen,
                                      ref=not args.no_ref)}
                    rows.append(row)
                    print(format_row(row), flush=True)
            del p
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (triton interpreter)",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "sweep": {k: (str(v) if k == "dtype" else v) for k, v in asdict(sweep).items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
