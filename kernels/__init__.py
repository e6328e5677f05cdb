"""Paged BD-LoRA kernels: the entry points the model calls.

`lora_shrink` / `lora_expand` take the arguments of the references in
`kernels.lora_ref` (see there for the paged layout and semantics) and run
one of three backends:

- "triton": the Triton kernels in `lora_shrink_op.py` / `lora_expand_op.py`
  (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 in tests);
- "torch": torch ops (`lora_torch.py`), the CPU serving path: per layout class
  (adapters of one rank and targets) one batched product over all its rows,
  with views of the factors in that layer's gathered pages; no adapter loop;
- "reference": the loop-per-adapter references (`lora_ref.py`), the spec.

The backend is, first to last: the call's `backend` keyword, `set_backend`,
the env var BDLORA_KERNEL_BACKEND, "auto"; "auto" picks triton for CUDA
tensors and torch otherwise. The Triton modules are imported on first use
only, so importing `kernels` defines no kernel (TRITON_INTERPRET must be set
before one is defined) and costs no Triton import on the CPU path.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .lora_ref import lora_expand_ref, lora_shrink_ref
from .lora_torch import StepCache, Workspace, lora_expand_torch, lora_shrink_torch

if TYPE_CHECKING:
    from .lora_shrink_op import Segments

BACKENDS = ("auto", "torch", "triton", "reference")
ENV_VAR = "BDLORA_KERNEL_BACKEND"
_backend: str | None = None  # set_backend's choice; None: the env var decides


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; known: {BACKENDS}")
    return name


def set_backend(name: str | None) -> None:
    """Select the backend for calls that name none; None returns the choice to the env var."""
    global _backend
    _backend = None if name is None else _check(name)


def get_backend() -> str:
    """The selected backend ("auto", "torch" or "triton"), before resolving "auto"."""
    return _backend if _backend is not None else _check(os.environ.get(ENV_VAR, "auto"))


def resolve_backend(backend: str | None, t: Tensor) -> str:
    """The concrete backend ("torch" or "triton") a call on tensor t runs."""
    name = _check(backend) if backend is not None else get_backend()
    if name == "auto":
        return "triton" if t.is_cuda else "torch"
    return name


def lora_segments(idx: Tensor, block_m: int = 16, num_slots: int | None = None) -> Segments:
    """Rows of a batch grouped by slot for the Triton kernels' prefill launch;
    compute once per batch, pass as `segments=` to every shrink/expand of it."""
    return importlib.import_module(".lora_shrink_op", __name__).lora_segments(idx, block_m, num_slots)


def plan_segments(idx: Tensor, num_slots: int, backend: str | None = None, *,
                  slot_class: Tensor | None = None, slot_pages: Tensor | None = None,
                  workspace: Workspace | None = None, slot_first: Tensor | None = None
                  ) -> Segments | StepCache | None:
    """What one step's kernels share, computed once per step and passed as `segments=` to
    every layer: for triton the rows grouped by slot when the batch is large enough for the
    sorted launch (else None); for torch a `StepCache` of the row plan and gathered pages
    that every layer reuses; None for the reference. `slot_class` / `slot_pages` ((S,) host
    int64, see `StepCache`) let the torch path share one page gather per layer, and `slot_first`
    (each slot's first page) read slots lying at a regular stride in place; `workspace`
    (a `Workspace` the caller keeps across steps) holds the gathered pages."""
    name = resolve_backend(backend, idx)
    if name == "torch":
        return StepCache(slot_class, slot_pages, workspace, slot_first)
    if name != "triton":
        return None
    op = importlib.import_module(".lora_shrink_op", __name__)
    block_m = op.sorted_block_m(idx.numel(), None)
    return None if block_m is None else op.lora_segments(idx, block_m, num_slots)


def _cache(segments: Any) -> StepCache | None:
    return segments if isinstance(segments, StepCache) else None


def _segments(segments: Any) -> Segments | None:
    return None if isinstance(segments, StepCache) else segments


def lora_shrink(
    x: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, a_offset: Tensor, rank: Tensor,
    max_rank: int, *, backend: str | None = None, segments: Segments | StepCache | None = None,
) -> Tensor:
    """h (T, n_slices, R) float32: h[t, s, :rank[a, s]] = x[t] @ A_s.T, a = idx[t];
    zero elsewhere. See `lora_shrink_ref`. `segments`: `plan_segments`'s for this batch."""
    name = resolve_backend(backend, x)
    if name == "reference":
        return lora_shrink_ref(x, pool, page_table, idx, a_offset, rank, max_rank)
    if name == "torch":
        return lora_shrink_torch(x, pool, page_table, idx, a_offset, rank, max_rank, _cache(segments))
    impl = importlib.import_module(".lora_shrink_op", __name__).lora_shrink
    return impl(x, pool, page_table, idx, a_offset, rank, max_rank, segments=_segments(segments))


def lora_expand(
    h: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, b_offset: Tensor, rank: Tensor,
    out_start: Tensor, out_len: Tensor, scale: Tensor, y: Tensor,
    *, backend: str | None = None, segments: Segments | StepCache | None = None,
) -> Tensor:
    """In place, returns y: y[t, o:o + n] += scale[a] * h[t, s, :r] @ B_s.T for
    a = idx[t] >= 0 and slices with r = rank[a, s] > 0. See `lora_expand_ref`."""
    name = resolve_backend(backend, y)
    if name == "reference":
        return lora_expand_ref(h, pool, page_table, idx, b_offset, rank, out_start, out_len, scale, y)
    if name == "torch":
        return lora_expand_torch(h, pool, page_table, idx, b_offset, rank, out_start, out_len, scale, y,
                                 _cache(segments))
    impl = importlib.import_module(".lora_expand_op", __name__).lora_expand
    return impl(h, pool, page_table, idx, b_offset, rank, out_start, out_len, scale, y, segments=_segments(segments))


__all__ = ["BACKENDS", "get_backend", "lora_expand", "lora_segments", "lora_shrink", "plan_segments",
           "resolve_backend", "set_backend", "StepCache", "Workspace"]
