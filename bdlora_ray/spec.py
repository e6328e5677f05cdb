"""What a replica group is: the one specification read by the deployment and by the engine.

`deploy/config.py` builds a `GroupConfig` from BDLORA_* variables; `bdlora_ray/group.py` builds the
group from the same object. Plain data: importing this module imports neither Ray, boto3 nor the engine,
so the deployment is configured (and its placement bundles computed) before any cluster exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdlora_ray.config import LlamaConfig
from bdlora_ray.placement import group_bundles

DEFAULT_ADAPTERS_URI = "s3://bdlora-adapters/adapters"

# Never passed to Ray in a runtime_env (Ray keeps those in its control store and shows them in its
# dashboard): every node's processes read them from the node's own environment or instance role.
CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})


@dataclass(frozen=True)
class S3Config:
    """Retries and timeouts of the adapter store's S3 calls."""

    connect_timeout_s: float = 5.0   # per connection attempt
    read_timeout_s: float = 60.0     # per socket read, not per object
    max_attempts: int = 5            # total tries per call, first one included
    retry_mode: str = "standard"     # botocore retry mode: "standard" or "adaptive"

    def botocore(self) -> Any:
        from botocore.config import Config  # here: the engine imports this module where boto3 is absent

        # botocore's "max_attempts" counts retries only; "total_max_attempts" counts the first try too.
        return Config(connect_timeout=self.connect_timeout_s, read_timeout=self.read_timeout_s,
                      retries={"total_max_attempts": self.max_attempts, "mode": self.retry_mode})


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64               # sequences in one batch at most
    max_num_batched_tokens: int = 2048   # rows of one forward pass, shared by decodes and prefill pieces
    max_model_len: int = 1024            # prompt + output tokens of one sequence
    num_pages: int = 1024                # pages per layer of the unified pool
    block_size: int = 16                 # tokens per KV page
    max_queue_len: int = 1024            # waiting requests; past it new ones get 503
    max_queue_wait_s: float = 120.0      # a request waiting longer fails with 503
    max_lora_rank: int = 64              # largest adapter rank served
    dtype: str = "float32"               # model and pool element type
    heartbeat_s: float = 5.0             # idle message to the other ranks, keeps their wait short
    enable_chunked_prefill: bool = True  # long prompts fed in pieces within the step budget, beside decodes
    enable_prefix_caching: bool = True   # full KV blocks shared by requests of one adapter version
    # A streamed request's events carry this many new tokens each (its first event, with TTFT, and its
    # last excepted): fewer, larger messages through the serving path at the price of a burstier
    # stream (vLLM's stream_interval; 1: an event per token).
    stream_interval: int = 1
    # Under load, at most about this many streamed events per step: with more streams running, each
    # event carries ceil(streams / N) tokens or more, so the serving path's per-event CPU stays
    # bounded as the batch grows (0: no limit; up to N streams, an event per token).
    stream_events_per_step: int = 16

    def __post_init__(self) -> None:
        if self.stream_interval < 1 or self.stream_events_per_step < 0:
            raise ValueError(f"need stream_interval >= 1 and stream_events_per_step >= 0, got "
                             f"{self.stream_interval} and {self.stream_events_per_step}")

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any], what: str = "engine settings") -> EngineConfig:
        """The defaults with `overrides` applied; an unknown field is refused, naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(overrides) - known):
            raise ValueError(f"unknown {what} {unknown}; EngineConfig has {sorted(known)}")
        return cls(**overrides)


@dataclass(frozen=True)
class GroupConfig:
    """One replica group: a Serve replica running TP rank 0 and the engine loop, and `tp - 1` TP
    worker actors, in one STRICT_PACK placement group."""

    model_path: str                              # local checkpoint dir (config.json, safetensors, tokenizer)
    adapters_uri: str = DEFAULT_ADAPTERS_URI     # s3://bucket/prefix where adapters live
    tp: int = 2                                  # TP degree = ranks = placement-group bundles
    model_name: str = ""                         # served base model name ("" -> directory name)
    engine: EngineConfig = EngineConfig()
    use_gpu: bool = False                        # one GPU per rank (NCCL), else fractional CPUs (gloo)
    worker_cpus: float = 0.25                    # CPUs per rank without GPUs (fractional: 2 cores here)
    replica_cpus: float = 0.1                    # bundle 0 beyond rank 0's share: scheduler, tokenizer, HTTP side
    max_ongoing_requests: int = 256              # Serve-level cap per group; the engine queues below it
    max_adapters_per_group: int = 4096           # adapters remembered for affinity routing per group
    store_cache_bytes: int = 2 << 30             # host cache of the adapter store
    store_name: str = ""                         # share one named store actor between groups ("" -> per model)
    s3: S3Config = S3Config()                    # retries and timeouts of the store's S3 calls
    # Environment of the group replicas (whose workers and adapter store copy the S3 endpoint and
    # region), e.g. the endpoint of a local S3. Never credentials (CREDENTIAL_VARS are refused).
    env_vars: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.max_adapters_per_group < 1 or self.max_ongoing_requests < 1:
            raise ValueError("max_adapters_per_group and max_ongoing_requests must be >= 1")
        if self.s3.max_attempts < 1 or self.s3.connect_timeout_s <= 0 or self.s3.read_timeout_s <= 0:
            raise ValueError("s3 max_attempts must be >= 1 and the S3 timeouts > 0")
        if secret := sorted(k for k, _ in self.env_vars if k in CREDENTIAL_VARS):
            raise ValueError(f"env_vars must not carry credentials ({', '.join(secret)}): Ray would keep them in "
                             "its control store; give each node its own (environment, instance role)")

    @property
    def served_name(self) -> str:
        return served_model_name(self.model_path, self.model_name)

    def model_config(self) -> LlamaConfig:
        return LlamaConfig.from_json(self.model_path, name=self.served_name)

    def bundles(self) -> list[dict[str, float]]:
        """Placement group bundles, one per TP rank: bundle 0 is the replica itself (it runs rank 0),
        rank i > 0 goes to bundle i."""
        return group_bundles(self.tp, self.use_gpu, self.worker_cpus, self.replica_cpus)


def served_model_name(model_path: str, model_name: str = "") -> str:
    """The base model's name in the API: explicit, else the checkpoint directory's name."""
    return model_name or Path(model_path).name


def without_credentials(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """`env` as `GroupConfig.env_vars`, credentials left out."""
    return tuple((k, v) for k, v in env.items() if k not in CREDENTIAL_VARS)


__all__ = ["CREDENTIAL_VARS", "EngineConfig", "GroupConfig", "S3Config", "served_model_name", "without_credentials"]
