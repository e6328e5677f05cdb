"""A Llama for ONE tensor-parallel rank, in plain torch: no Ray, no collectives.

Tokens of all sequences in a step are flattened into one dimension T (as in
vLLM), so rows of one batch may belong to different sequences, and through
the LoRA batch to different adapters. `bdlora_ray.tp` shards this model:
it swaps the linears for column/row-parallel ones (which add LoRA and the
all-reduce) and sets `n_local_heads`; the math here does not change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdlora_ray.attention import AttentionMeta, attend
from bdlora_ray.config import LlamaConfig


def rope_inv_freq(cfg: LlamaConfig, device: torch.device | str = "cpu") -> Tensor:
    """Rotary inverse frequencies, with Llama-3.1 ('llama3') scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's rotate-half convention. x: (T, heads, hd); cos/sin: (T, 1, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.n_local_heads = cfg.num_heads        # divided by the TP degree in tp.py
        self.n_local_kv_heads = cfg.num_kv_heads
        self.wqkv = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=False)  # q|k|v fused
        self.wo = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMeta) -> Tensor:
        T = x.shape[0]
        q_size, kv_size = self.n_local_heads * self.head_dim, self.n_local_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(T, self.n_local_heads, self.head_dim), cos, sin)      # (T, nh, hd)
        k = apply_rope(k.view(T, self.n_local_kv_heads, self.head_dim), cos, sin)   # (T, nkv, hd)
        v = v.view(T, self.n_local_kv_heads, self.head_dim)                         # (T, nkv, hd)
        o = attend(q, k, v, meta, self.layer_id)                                    # (T, nh, hd)
        return self.wo(o.reshape(T, q_size))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate|up fused
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int) -> None:
        super().__init__()
        self.attention = Attention(cfg, layer_id)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMeta) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, meta)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: Tensor | None = None  # computed on first use, on the model's device

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.cfg, positions.device)
        freqs = positions.float()[:, None] * self._inv_freq[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]             # (T, 1, hd)
        return emb.cos(), emb.sin()

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMeta,
                logits_rows: Tensor | None = None) -> Tensor:
        """input_ids, positions: (T,). Returns logits (T, vocab), or only for `logits_rows`."""
        x = self.tok_embeddings(input_ids)                                 # (T, H)
        cos, sin = self.rope(positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, meta)
        x = self.norm(x)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.output(x).float()                                      # (T, vocab)
