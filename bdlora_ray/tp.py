"""Apply tensor parallelism to the plain model, and load one rank's weights.

As in gpt-fast's tp.py: the model is built unsharded (on the meta device, so
nothing is allocated), then its linears are swapped for parallel ones with
this rank's shapes, then each weight is read from the HF safetensors
checkpoint as ONLY this rank's slice (`safe_open(...).get_slice`).
"""

from __future__ import annotations

import json
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


class TPModel:
    """One rank's sharded Llama plus the LoRA context its linears read."""

    def __init__(self, cfg: LlamaConfig, checkpoint: str | Path, comm: Comm,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.comm, self.device, self.dtype = cfg, comm, torch.device(device), dtype
        self.ctx = LoraContext()
        with torch.device("meta"):
            model = Transformer(cfg)
        shard_model(model, comm, self.ctx)
        model = model.to_empty(device=self.device).to(dtype)
        load_rank_weights(model, CheckpointReader(checkpoint), comm)
        self.model = model.eval()

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMeta,
                lora: LoraBatch | None = None, logits_rows: Tensor | None = None) -> Tensor:
        self.ctx.batch = lora
        try:
            return self.model(input_ids.to(self.device), positions.to(self.device), meta, logits_rows)
        finally:
            self.ctx.batch = None
