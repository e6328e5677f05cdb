"""Read a PEFT LoRA / BD-LoRA adapter directory: JSON + safetensors only."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from bdlora_ray.errors import AdapterInvalid
from bdlora_ray.lora.layout import COLUMN_TARGETS, ROW_TARGETS, TARGETS

_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(TARGETS) + r")\.lora_([AB])\.weight$")

# Features of LoraConfig that change the forward beyond y += s * B(Ax).
_UNSUPPORTED = {
    "use_dora": "DoRA", "modules_to_save": "modules_to_save", "rank_pattern": "per-module rank_pattern",
    "alpha_pattern": "per-module alpha_pattern", "layers_to_transform": "layers_to_transform",
    "fan_in_fan_out": "fan_in_fan_out", "trainable_token_indices": "trainable_token_indices",
}


@dataclass(frozen=True)
class BlockDiagonal:
    """PEFT's BdLoraConfig: which targets have a block-diagonal A or B."""

    a_targets: tuple[str, ...]  # lora_A stored stacked as (r, d_in / nblocks)
    b_targets: tuple[str, ...]  # lora_B stored stacked as (d_out, r / nblocks)
    nblocks: int


@dataclass
class PeftAdapter:
    name: str
    rank: int
    alpha: float
    scale: float                        # s in y += s * B(Ax)
    targets: tuple[str, ...]            # in TARGETS order
    num_layers: int
    base_model: str                     # base_model_name_or_path, may be ""
    block_diagonal: BlockDiagonal | None
    tensors: dict[tuple[int, str, str], Tensor]  # (layer, target, "A"|"B") -> PEFT-stored weight

    def dense(self, layer: int, target: str) -> tuple[Tensor, Tensor]:
        """(A (r, d_in), B (d_out, r)) with any block-diagonal factor expanded."""
        A, B = self.tensors[(layer, target, "A")], self.tensors[(layer, target, "B")]
        bd = self.block_diagonal
        if bd and target in bd.a_targets:
            A = torch.block_diag(*A.chunk(bd.nblocks, dim=0))
        if bd and target in bd.b_targets:
            B = torch.block_diag(*B.chunk(bd.nblocks, dim=0))
        return A, B


def _match(patterns: list[str] | str | None, target: str) -> bool:
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, target) is not None or patterns == target
    return any(p in target for p in patterns)  # PEFT matches BD patterns by substring


def load_peft_adapter(path: str | Path, name: str | None = None) -> PeftAdapter:
    """Parse `adapter_config.json` + `adapter_model.safetensors` (never pickle)."""
    path = Path(path)
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise AdapterInvalid(f"{path}: needs adapter_config.json and adapter_model.safetensors "
                             "(pickled .bin adapters are not read)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{cfg_file}: not valid JSON: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterInvalid(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    for field, what in _UNSUPPORTED.items():
        if cfg.get(field):
            raise AdapterInvalid(f"adapter uses {what}, which is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise AdapterInvalid("adapter trains biases, which is not supported")
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    if rank <= 0:
        raise AdapterInvalid(f"rank {rank} must be positive")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

    bd = None
    if cfg.get("use_bdlora"):
        b = cfg["use_bdlora"]
        bd = BlockDiagonal(
            a_targets=tuple(t for t in TARGETS if _match(b.get("target_modules_bd_a"), t)),
            b_targets=tuple(t for t in TARGETS if _match(b.get("target_modules_bd_b"), t)),
            nblocks=int(b.get("nblocks", 1)))

    tensors: dict[tuple[int, str, str], Tensor] = {}
    for key, t in load_file(str(weights_file)).items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterInvalid(f"unsupported tensor {key!r} (targets must be among {TARGETS})")
        tensors[(int(m[1]), m[2], m[3])] = t
    if not tensors:
        raise AdapterInvalid(f"{weights_file}: no LoRA tensors")
    targets = tuple(t for t in TARGETS if any(k[1] == t for k in tensors))
    num_layers = 1 + max(k[0] for k in tensors)
    for layer in range(num_layers):
        for t in targets:
            for f in "AB":
                if (layer, t, f) not in tensors:
                    raise AdapterInvalid(f"missing lora_{f} of layer {layer} {t}")
    if bd:
        bad = [t for t in targets if t in bd.a_targets and t in bd.b_targets]
        if bad:
            raise AdapterInvalid(f"targets {bad} have both factors block-diagonal")
    return PeftAdapter(
        name=name or path.name, rank=rank, alpha=alpha, scale=scale, targets=targets,
        num_layers=num_layers, base_model=str(cfg.get("base_model_name_or_path") or ""),
        block_diagonal=bd, tensors=tensors)


__all__ = ["BlockDiagonal", "PeftAdapter", "load_peft_adapter", "COLUMN_TARGETS", "ROW_TARGETS"]
