"""Model configuration: a frozen dataclass, named presets, and HF config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling ('llama3' rope_type)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    name: str = "tiny"
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def out_features(self, target: str) -> int:
        return {
            "q_proj": self.q_size, "k_proj": self.kv_size, "v_proj": self.kv_size,
            "o_proj": self.hidden_size, "gate_proj": self.intermediate_size,
            "up_proj": self.intermediate_size, "down_proj": self.hidden_size,
        }[target]

    def in_features(self, target: str) -> int:
        return {"o_proj": self.q_size, "down_proj": self.intermediate_size}.get(target, self.hidden_size)

    def check_tp(self, tp: int) -> None:
        """Raise ValueError unless every sharded dimension divides by `tp`."""
        for what, n in (("num_heads", self.num_heads), ("num_kv_heads", self.num_kv_heads),
                        ("intermediate_size", self.intermediate_size), ("vocab_size", self.vocab_size)):
            if n % tp:
                raise ValueError(f"{what}={n} of model {self.name!r} is not divisible by TP degree {tp}")

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "hf") -> "LlamaConfig":
        """Build from the dict of an HF Llama `config.json`."""
        rs = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
        rope_type = rs.get("rope_type", rs.get("type"))
        rope_theta = hf.get("rope_theta", rs.get("rope_theta", 10000.0))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
        elif rope_type not in (None, "default"):
            raise ValueError(f"unsupported rope scaling {rope_type!r}")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            name=name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
            rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=eos)

    @classmethod
    def from_json(cls, path: str | Path, name: str | None = None) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_hf(json.loads(path.read_text()), name=name or path.parent.name)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict of this config (used to build references)."""
        hf: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
        }
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            hf["rope_scaling"] = {
                "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings}
        return hf

    def with_(self, **changes: Any) -> "LlamaConfig":
        return replace(self, **changes)


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(),
    "llama-3.1-8b": LlamaConfig(
        name="llama-3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=RopeScaling(), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=(128001, 128008, 128009)),
    "llama-3.1-70b": LlamaConfig(
        name="llama-3.1-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=RopeScaling(), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=(128001, 128008, 128009)),
}
