"""Where an adapter shard's weights live inside its pages of the unified pool.

A per-rank shard is a dict of tensors named `layers.{l}.{target}.lora_A`
(shape (r_A, d_in_local)) and `layers.{l}.{target}.lora_B`
(shape (d_out_B, r_B)). Every layer of one shard has the same shapes, so one
`AdapterLayout` describes the adapter's per-layer *virtual buffer*: per fused
linear of the model (`GROUPS`: q|k|v, o, gate|up, down), the A factors of its
targets present, in order, then their B factors, packed back to back: each A
row-major as it is, each B transposed (B.T, (r, d_out) row-major; see
`kernels.lora_ref`). A fused linear's A factors (all of width d_in) thus form
one (sum of ranks, d_in) matrix, so a kernel may apply them in one product. The
adapter owns `num_pages(P)` pages, and uses the same page ids in
every layer of the pool (as S-LoRA does), so one page table per adapter
serves all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fused linear of the model -> the LoRA targets it carries, in output order (TARGETS order overall).
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
COLUMN_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_TARGETS = ("o_proj", "down_proj")


def tensor_name(layer: int, target: str, factor: str) -> str:
    """Name of one factor ('A' or 'B') of one target in a per-rank shard."""
    return f"layers.{layer}.{target}.lora_{factor}"


@dataclass(frozen=True)
class Segment:
    target: str   # one of TARGETS
    factor: str   # "A" or "B"
    offset: int   # first element in the per-layer virtual buffer
    rows: int     # the factor's shape: (r, d_in) for A, (d_out, r) for B
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def stored_shape(self) -> tuple[int, int]:
        """Shape of the row-major matrix at `offset`: A as it is, B transposed."""
        return (self.rows, self.cols) if self.factor == "A" else (self.cols, self.rows)

    def stored(self, factor: Tensor) -> Tensor:
        """The factor as it lies in the buffer (a view of it)."""
        return factor if self.factor == "A" else factor.T

    def unstored(self, stored: Tensor) -> Tensor:
        """The factor, from the `stored_shape` matrix read at `offset` (a view of it)."""
        return stored if self.factor == "A" else stored.T


@dataclass(frozen=True)
class AdapterLayout:
    num_layers: int
    segments: tuple[Segment, ...]  # per group of GROUPS: its targets' A factors, then their B factors

    @property
    def layer_numel(self) -> int:
        """Elements of one layer's virtual buffer."""
        return sum(s.numel for s in self.segments)

    def num_pages(self, page_elems: int) -> int:
        return -(-self.layer_numel // page_elems)

    def segment(self, target: str, factor: str) -> Segment | None:
        for s in self.segments:
            if s.target == target and s.factor == factor:
                return s
        return None

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(s.target for s in self.segments if s.factor == "A")

    @classmethod
    def from_shapes(cls, num_layers: int, shapes: dict[str, tuple[int, int]]) -> "AdapterLayout":
        """`shapes` maps `{target}.lora_{A|B}` to (rows, cols) of layer 0."""
        segments, offset = [], 0
        for targets in GROUPS.values():
            for factor in ("A", "B"):
                for target in targets:
                    key = f"{target}.lora_{factor}"
                    if key not in shapes:
                        continue
                    rows, cols = shapes[key]
                    segments.append(Segment(target, factor, offset, rows, cols))
                    offset += rows * cols
        return cls(num_layers, tuple(segments))

    @classmethod
    def from_shard(cls, num_layers: int, shard: dict[str, Tensor]) -> "AdapterLayout":
        shapes = {}
        for target in TARGETS:
            for factor in ("A", "B"):
                t = shard.get(tensor_name(0, target, factor))
                if t is not None:
                    shapes[f"{target}.lora_{factor}"] = tuple(t.shape)
        return cls.from_shapes(num_layers, shapes)

    def pack_layer(self, shard: dict[str, Tensor], layer: int, page_elems: int) -> Tensor:
        """One layer's virtual buffer, zero-padded to whole pages: (num_pages, P)."""
        n = self.num_pages(page_elems)
        buf = torch.zeros(n * page_elems, dtype=next(iter(shard.values())).dtype)
        for s in self.segments:
            t = s.stored(shard[tensor_name(layer, s.target, s.factor)])
            buf[s.offset:s.offset + s.numel].view(s.stored_shape).copy_(t)
        return buf.view(n, page_elems)

    def write_to_pool(self, shard: dict[str, Tensor], pool: Tensor, pages: Tensor) -> None:
        """Copy a shard into its pages; `pool` is (num_layers, num_pages, P)."""
        page_elems = pool.shape[2]
        pages = pages.to(pool.device, torch.long)
        for layer in range(self.num_layers):
            pool[layer, pages] = self.pack_layer(shard, layer, page_elems).to(pool.device, pool.dtype)
