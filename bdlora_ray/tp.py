"""Apply tensor parallelism to the plain model, and load one rank's weights.

As in gpt-fast's tp.py: the model is built unsharded (on the meta device, so
nothing is allocated), then its linears are swapped for parallel ones with
this rank's shapes, then each weight is read from the HF safetensors
checkpoint as ONLY this rank's slice (`safe_open(...).get_slice`).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from bdlora_ray.attention import AttentionMeta
from bdlora_ray.comm import Comm
from bdlora_ray.config import LlamaConfig
from bdlora_ray.lora.batch import LoraBatch
from bdlora_ray.model import Transformer
from bdlora_ray.parallel import (ColumnParallelLinear, LoraContext, ParallelLMHead, RowParallelLinear,
                                 VocabParallelEmbedding)


def shard_model(model: Transformer, comm: Comm, ctx: LoraContext) -> None:
    """Replace the model's embedding, head and linears by this rank's parallel versions."""
    cfg, n = model.cfg, comm.world_size
    cfg.check_tp(n)
    H, inter = cfg.hidden_size, cfg.intermediate_size
    model.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, H, comm)
    head_src = model.tok_embeddings if cfg.tie_word_embeddings else H
    model.output = ParallelLMHead(head_src, cfg.vocab_size, comm)
    for i, block in enumerate(model.layers):
        attn, ff = block.attention, block.feed_forward
        attn.n_local_heads, attn.n_local_kv_heads = cfg.num_heads // n, cfg.num_kv_heads // n
        attn.wqkv = ColumnParallelLinear(H, (cfg.q_size + 2 * cfg.kv_size) // n, comm, ctx, "qkv", i)
        attn.wo = RowParallelLinear(cfg.q_size // n, H, comm, ctx, "o", i)
        ff.w13 = ColumnParallelLinear(H, 2 * inter // n, comm, ctx, "gate_up", i)
        ff.w2 = RowParallelLinear(inter // n, H, comm, ctx, "down", i)


class CheckpointReader:
    """Reads slices of tensors from an HF safetensors checkpoint (one file or an index)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: path / f for name, f in weight_map.items()}
        else:
            single = path / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
            with safe_open(str(single), "pt") as f:
                self.files = {name: single for name in f.keys()}
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, dim: int | None = None, part: int = 0, parts: int = 1) -> Tensor:
        """Tensor `name`, or its `part`-th of `parts` equal chunks along `dim`."""
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), "pt")
        sl = self._open[file].get_slice(name)
        if dim is None:
            return sl[:]
        size = sl.get_shape()[dim] // parts
        a, b = part * size, (part + 1) * size
        return sl[a:b] if dim == 0 else sl[:, a:b]


@torch.no_grad()
def load_rank_weights(model: Transformer, reader: CheckpointReader, comm: Comm) -> None:
    i, n = comm.rank, comm.world_size
    rows = lambda name: reader.read(name, 0, i, n)  # noqa: E731  column-parallel slice O_i
    cols = lambda name: reader.read(name, 1, i, n)  # noqa: E731  row-parallel slice I_i
    model.tok_embeddings.weight.copy_(rows("model.embed_tokens.weight"))
    if model.output.tied is None:
        model.output.weight.copy_(rows("lm_head.weight"))
    model.norm.weight.copy_(reader.read("model.norm.weight"))
    for l, block in enumerate(model.layers):
        p = f"model.layers.{l}."
        block.attention_norm.weight.copy_(reader.read(p + "input_layernorm.weight"))
        block.ffn_norm.weight.copy_(reader.read(p + "post_attention_layernorm.weight"))
        block.attention.wqkv.weight.copy_(torch.cat([rows(p + f"self_attn.{t}_proj.weight") for t in "qkv"]))
        block.attention.wo.weight.copy_(cols(p + "self_attn.o_proj.weight"))
        block.feed_forward.w13.weight.copy_(torch.cat([rows(p + "mlp.gate_proj.weight"), rows(p + "mlp.up_proj.weight")]))
        block.feed_forward.w2.weight.copy_(cols(p + "mlp.down_proj.weight"))


class RandomWeights:
    """A stand-in for a checkpoint, with CheckpointReader's `read`: seeded random slices made
    directly on `device` in `dtype` (benchmarks of large shapes need no file and no host copy).
    Each (tensor, part) has its own seed, so every rank draws only its slices."""

    def __init__(self, cfg: LlamaConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, std: float = 0.02) -> None:
        self.cfg, self.device, self.dtype, self.seed, self.std = cfg, torch.device(device), dtype, seed, std
        self.shapes = self._shapes(cfg)

    @staticmethod
    def _shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
        H, V = cfg.hidden_size, cfg.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, H)
        for l in range(cfg.num_layers):
            p = f"model.layers.{l}."
            shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (H,)
            for t in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[f"{p}self_attn.{t}.weight"] = (cfg.out_features(t), cfg.in_features(t))
            for t in ("gate_proj", "up_proj", "down_proj"):
                shapes[f"{p}mlp.{t}.weight"] = (cfg.out_features(t), cfg.in_features(t))
        return shapes

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def read(self, name: str, dim: int | None = None, part: int = 0, parts: int = 1) -> Tensor:
        shape = list(self.shapes[name])
        if dim is not None:
            shape[dim] //= parts
        if len(shape) == 1:  # norms: near 1, as trained ones are
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        g = torch.Generator(device=self.device)
        g.manual_seed(zlib.crc32(f"{self.seed}/{name}/{part}".encode()))  # stable across processes
        w = torch.empty(shape, dtype=self.dtype, device=self.device)
        return w.normal_(0.0, self.std, generator=g)


class TPModel:
    """One rank's sharded Llama plus the LoRA context its linears read.

    `weights`: an HF checkpoint directory, or any object with CheckpointReader's `read`
    (e.g. `RandomWeights`). Parameters are created in `dtype` on the meta device and only then
    allocated on `device`, so no float32 copy of the model ever exists there."""

    def __init__(self, cfg: LlamaConfig, weights: str | Path | CheckpointReader | RandomWeights, comm: Comm,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.comm, self.device, self.dtype = cfg, comm, torch.device(device), dtype
        self.ctx = LoraContext()
        with torch.device("meta"):  # the parallel layers too: nothing is allocated before to_empty
            model = Transformer(cfg)
            shard_model(model, comm, self.ctx)
        model = model.to(dtype=dtype).to_empty(device=self.device)
        reader = weights if hasattr(weights, "read") else CheckpointReader(weights)
        load_rank_weights(model, reader, comm)
        self.model = model.eval()

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMeta,
                lora: LoraBatch | None = None, logits_rows: Tensor | None = None) -> Tensor | None:
        """Logits (T, vocab) float32 on every rank; or, with `logits_rows` (the rows rank 0
        samples), only those rows' logits, gathered to rank 0 alone (other ranks get None)."""
        self.ctx.batch = lora
        try:
            local = self.model(input_ids.to(self.device), positions.to(self.device), meta, logits_rows)  # (T, V/N)
        finally:
            self.ctx.batch = None
        if self.comm.world_size == 1:
            return local
        parts = self.comm.gather(local) if logits_rows is not None else self.comm.all_gather(local)  # (N, T, V/N)
        return None if parts is None else parts.permute(1, 0, 2).reshape(local.shape[0], -1)
