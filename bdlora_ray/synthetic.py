"""Random models and adapters in the formats HF transformers and PEFT save,
for the embedded default, demos and benchmarks (no hub access, no training).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from bdlora_ray.config import LlamaConfig
from bdlora_ray.lora.layout import COLUMN_TARGETS, TARGETS
from bdlora_ray.lora.peft import BlockDiagonal, PeftAdapter
from bdlora_ray.tokenizer import save_byte_tokenizer

_MODULE = {t: ("self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for t in TARGETS}


def write_random_checkpoint(cfg: LlamaConfig, path: str | Path, seed: int = 0, std: float = 0.08,
                            dtype: torch.dtype = torch.float32) -> Path:
    """An HF Llama checkpoint (config.json, model.safetensors, byte tokenizer) of random weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (torch.randn(shape, generator=g) * std).to(dtype)  # noqa: E731
    norm = lambda: (1 + 0.1 * torch.rand(cfg.hidden_size, generator=g)).to(dtype)  # noqa: E731
    w = {"model.embed_tokens.weight": rand(cfg.vocab_size, cfg.hidden_size), "model.norm.weight": norm()}
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = rand(cfg.vocab_size, cfg.hidden_size)
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        for t in TARGETS:
            w[f"{p}{_MODULE[t]}.{t}.weight"] = rand(cfg.out_features(t), cfg.in_features(t))
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})
    hf = cfg.to_hf() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    save_byte_tokenizer(path)
    return path


def random_adapter(cfg: LlamaConfig, rank: int, targets: tuple[str, ...] = TARGETS, nblocks: int | None = None,
                   alpha: float | None = None, seed: int = 0, std: float = 0.1, name: str = "random") -> PeftAdapter:
    """A LoRA with random nonzero A and B; block-diagonal as PEFT's BdLoraConfig makes them
    (A of row layers, B of column layers) when `nblocks` is set."""
    g = torch.Generator().manual_seed(seed)
    bd = None
    if nblocks is not None:
        bd = BlockDiagonal(a_targets=tuple(t for t in targets if t not in COLUMN_TARGETS),
                           b_targets=tuple(t for t in targets if t in COLUMN_TARGETS), nblocks=nblocks)
    tensors = {}
    for layer in range(cfg.num_layers):
        for t in targets:
            d_in, d_out = cfg.in_features(t), cfg.out_features(t)
            a_cols = d_in // nblocks if bd and t in bd.a_targets else d_in
            b_cols = rank // nblocks if bd and t in bd.b_targets else rank
            tensors[(layer, t, "A")] = torch.randn(rank, a_cols, generator=g) * std
            tensors[(layer, t, "B")] = torch.randn(d_out, b_cols, generator=g) * std
    alpha = float(alpha if alpha is not None else 2 * rank)
    return PeftAdapter(name=name, rank=rank, alpha=alpha, scale=alpha / rank,
                       targets=tuple(t for t in TARGETS if t in targets), num_layers=cfg.num_layers,
                       base_model=cfg.name, block_diagonal=bd, tensors=tensors)


def write_peft_adapter(adapter: PeftAdapter, path: str | Path) -> Path:
    """Save in PEFT's layout (adapter_config.json + adapter_model.safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bd = adapter.block_diagonal
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
        "target_modules": list(adapter.targets), "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": adapter.base_model, "use_rslora": False, "use_dora": False,
        "use_bdlora": None if bd is None else {
            "target_modules_bd_a": list(bd.a_targets), "target_modules_bd_b": list(bd.b_targets),
            "nblocks": bd.nblocks, "match_strict": False},
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {f"base_model.model.model.layers.{l}.{_MODULE[t]}.{t}.lora_{f}.weight": w.contiguous()
               for (l, t, f), w in adapter.tensors.items()}
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path
