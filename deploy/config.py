"""Deployment configuration: the ONE place that reads environment variables.

Every field has a default, and the defaults are the embedded set-up
(`make run`): SmolLM2-135M-Instruct converted under `.bdlora/` with its
demo adapters in a local S3 bucket, TP=3 on CPU, one replica group
(BDLORA_DEMO_MODEL=tiny: the tiny random Llama at TP=2 instead). A real cluster sets a few
variables (see README.md and deploy/serve_config.yaml):

    BDLORA_MODEL_PATH       local dir with config.json, safetensors, tokenizer
    BDLORA_MODEL_NAME       served name of the base model (default: the dir name)
    BDLORA_ADAPTERS_URI     s3://bucket/prefix holding the adapters
    BDLORA_TP               TP degree of every replica group
    BDLORA_USE_GPU          1: one {"GPU": 1} bundle per TP worker
    BDLORA_NUM_GROUPS       fixed number of replica groups (sets min and max)
    BDLORA_MIN_GROUPS, BDLORA_MAX_GROUPS, BDLORA_TARGET_ONGOING_REQUESTS   autoscaling
    BDLORA_UPSCALE_DELAY_S, BDLORA_DOWNSCALE_DELAY_S, BDLORA_LOOK_BACK_PERIOD_S   how fast Serve reacts to load
    BDLORA_GRACEFUL_SHUTDOWN_TIMEOUT_S   how long a group being removed may take to finish its requests
    BDLORA_ADMIN_TOKEN      bearer token for POST/DELETE /v1/adapters (unset: open)
    BDLORA_INGRESS          auto (default): with one group the group's replica serves the API; separate: an
                            Ingress deployment in front, as with several groups (deploy/app.py)
    BDLORA_S3_MAX_ATTEMPTS, BDLORA_S3_CONNECT_TIMEOUT_S, BDLORA_S3_READ_TIMEOUT_S   how long a cold adapter
                            may wait for an unreachable or throttling S3 before its request gets 503
    BDLORA_ENGINE_<FIELD>   any EngineConfig field, e.g. BDLORA_ENGINE_MAX_NUM_SEQS=64
    BDLORA_HOST, BDLORA_PORT, BDLORA_S3_PORT, BDLORA_STATE_DIR, BDLORA_DEMO_MODEL   embedded server only
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The group's specification is the engine's own (bdlora_ray/spec.py); these names are re-exported for the deployment.
from bdlora_ray.spec import (CREDENTIAL_VARS, DEFAULT_ADAPTERS_URI, EngineConfig, GroupConfig,  # noqa: F401
                             without_credentials)
from bdlora_ray.store.s3 import S3Config
from deploy.cluster_env import FRONTS

ENV_PREFIX = "BDLORA_"
ENGINE_PREFIX = "BDLORA_ENGINE_"
INGRESS_LAYOUTS = ("auto", "separate")        # ApiConfig.ingress: where the HTTP API runs (deploy/app.py)
DEFAULT_STATE_DIR = ".bdlora"                 # embedded checkpoint + demo adapters, under the project
# The embedded base models: checkpoint dir under the state dir (its name is the served name), TP degree.
DEMO_MODELS = {"smollm2": ("SmolLM2-135M-Instruct", 3), "tiny": ("tiny-llama", 2)}
DEFAULT_DEMO_MODEL = "smollm2"


@dataclass(frozen=True)
class ScalingConfig:
    """Serve autoscaling of the replica-group deployment."""

    min_groups: int = 1
    max_groups: int = 1
    initial_groups: int | None = None           # None: min_groups
    target_ongoing_requests: float = 32.0       # per group; above it Serve adds a group
    # None: Serve's defaults (30 s, 600 s, 30 s). A new group means a new node: cloud minutes, so
    # upscaling early matters less than not downscaling a node that the next burst needs again.
    upscale_delay_s: float | None = None        # load above target this long before a group is added
    downscale_delay_s: float | None = None      # load below target this long before a group is removed
    look_back_period_s: float | None = None     # window the ongoing-request average is taken over
    graceful_shutdown_timeout_s: float = 30.0   # a group being removed finishes its requests within this

    def __post_init__(self) -> None:
        if not 1 <= self.min_groups <= self.max_groups:
            raise ValueError(f"need 1 <= min_groups <= max_groups, got {self.min_groups}, {self.max_groups}")
        delays = (self.upscale_delay_s, self.downscale_delay_s, self.look_back_period_s)
        if any(d is not None and d <= 0 for d in delays) or self.graceful_shutdown_timeout_s <= 0:
            raise ValueError("autoscaling delays and the graceful shutdown timeout must be > 0")

    def autoscaling_config(self) -> dict[str, Any]:
        delays = {"upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                  "look_back_period_s": self.look_back_period_s}
        return {"min_replicas": self.min_groups, "max_replicas": self.max_groups,
                "initial_replicas": self.initial_groups or self.min_groups,
                "target_ongoing_requests": self.target_ongoing_requests,
                **{k: v for k, v in delays.items() if v is not None}}


@dataclass(frozen=True)
class ApiConfig:
    """The HTTP ingress."""

    model_name: str                              # served base model name
    admin_token: str = field(default="", repr=False)  # "" -> admin endpoints open; never logged
    max_body_bytes: int = 4 << 20                # larger request bodies get 413
    max_adapter_labels: int = 100                # distinct adapter label values in /metrics, rest "_other"
    backend_timeout_s: float = 30.0              # admin and stats calls to the groups
    ingress_replicas: int = 1                    # Ingress replicas, when the API has a deployment of its own
    max_ongoing_requests: int = 1024             # per ingress replica (each stream holds one)
    # Where the API runs (deploy/app.py): "auto" in the group's own replica when the app has one group
    # and one ingress replica, else in an Ingress deployment in front of the groups; "separate" always there.
    ingress: str = "auto"

    def __post_init__(self) -> None:
        if self.ingress not in INGRESS_LAYOUTS:
            raise ValueError(f"BDLORA_INGRESS={self.ingress!r}: one of {', '.join(INGRESS_LAYOUTS)}")
        if self.ingress_replicas < 1:
            raise ValueError(f"BDLORA_INGRESS_REPLICAS={self.ingress_replicas}: at least 1")


@dataclass(frozen=True)
class EmbeddedConfig:
    """`python -m deploy.embedded` only."""

    host: str = "127.0.0.1"
    port: int = 8000
    s3_port: int = 8001                          # the local S3 server (moto) when none is configured
    state_dir: str = DEFAULT_STATE_DIR           # checkpoint and PEFT demo adapters
    ray_temp_dir: str = "/tmp/bdlora-ray"
    local_s3: bool = True                        # no BDLORA_ADAPTERS_URI: run a local S3 and push demo adapters
    seed_model: bool = True                      # no BDLORA_MODEL_PATH: write `demo_model`'s checkpoint
    demo_model: str = DEFAULT_DEMO_MODEL         # a key of DEMO_MODELS
    http_front: str = "python"                   # Serve's HTTP front: python or haproxy (deploy/cluster_env.py)

    def __post_init__(self) -> None:
        if self.demo_model not in DEMO_MODELS:
            raise ValueError(f"BDLORA_DEMO_MODEL={self.demo_model!r}: one of {sorted(DEMO_MODELS)}")
        if self.http_front not in FRONTS:
            raise ValueError(f"BDLORA_HTTP_FRONT={self.http_front!r}: one of {', '.join(FRONTS)}")


@dataclass(frozen=True)
class AppConfig:
    group: GroupConfig
    scaling: ScalingConfig = ScalingConfig()
    api: ApiConfig | None = None                 # None: derived from `group`
    embedded: EmbeddedConfig = EmbeddedConfig()

    def __post_init__(self) -> None:
        if self.api is None:
            object.__setattr__(self, "api", ApiConfig(model_name=self.group.served_name))

    @property
    def api_in_group(self) -> bool:
        """Whether the group's replica serves the API itself (one deployment; deploy/app.py): with one
        group there is nothing to route, so the Ingress's process hop buys nothing."""
        assert self.api is not None
        return self.api.ingress == "auto" and self.scaling.max_groups == 1 and self.api.ingress_replicas == 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AppConfig:
        env = os.environ if env is None else env
        r = _Reader(env)
        embedded = EmbeddedConfig(host=r.str("HOST", "127.0.0.1"), port=r.int("PORT", 8000),
                                  s3_port=r.int("S3_PORT", 8001),
                                  state_dir=r.str("STATE_DIR", DEFAULT_STATE_DIR),
                                  local_s3=r.str("ADAPTERS_URI", "") == "",
                                  seed_model=r.str("MODEL_PATH", "") == "",
                                  demo_model=r.str("DEMO_MODEL", DEFAULT_DEMO_MODEL),
                                  http_front=r.str("HTTP_FRONT", "python"))
        model_dir, demo_tp = DEMO_MODELS[embedded.demo_model]
        default_model = str(Path(embedded.state_dir, model_dir).resolve())
        engine = {k[len(ENGINE_PREFIX):].lower(): _scalar(k, v) for k, v in env.items() if k.startswith(ENGINE_PREFIX)}
        group = GroupConfig(
            model_path=r.str("MODEL_PATH", default_model), adapters_uri=r.str("ADAPTERS_URI", DEFAULT_ADAPTERS_URI),
            tp=r.int("TP", demo_tp), model_name=r.str("MODEL_NAME", ""), use_gpu=r.bool("USE_GPU", False),
            replica_cpus=r.float("REPLICA_CPUS", 0.1), worker_cpus=r.float("WORKER_CPUS", 0.25),
            max_ongoing_requests=r.int("MAX_ONGOING_REQUESTS", 256),
            max_adapters_per_group=r.int("MAX_ADAPTERS_PER_GROUP", 4096),
            s3=S3Config(max_attempts=r.int("S3_MAX_ATTEMPTS", 5), connect_timeout_s=r.float("S3_CONNECT_TIMEOUT_S", 5.0),
                        read_timeout_s=r.float("S3_READ_TIMEOUT_S", 60.0)),
            engine=EngineConfig.from_overrides(engine, f"engine settings ({ENGINE_PREFIX}<FIELD>)"))
        fixed = r.int("NUM_GROUPS", 0)
        scaling = ScalingConfig(min_groups=fixed or r.int("MIN_GROUPS", 1),
                                max_groups=fixed or r.int("MAX_GROUPS", max(1, r.int("MIN_GROUPS", 1))),
                                target_ongoing_requests=r.float("TARGET_ONGOING_REQUESTS", 32.0),
                                upscale_delay_s=r.optional_float("UPSCALE_DELAY_S"),
                                downscale_delay_s=r.optional_float("DOWNSCALE_DELAY_S"),
                                look_back_period_s=r.optional_float("LOOK_BACK_PERIOD_S"),
                                graceful_shutdown_timeout_s=r.float("GRACEFUL_SHUTDOWN_TIMEOUT_S", 30.0))
        api = ApiConfig(model_name=group.served_name, admin_token=r.str("ADMIN_TOKEN", ""),
                        max_body_bytes=r.int("MAX_BODY_BYTES", 4 << 20),
                        max_adapter_labels=r.int("MAX_ADAPTER_LABELS", 100),
                        ingress_replicas=r.int("INGRESS_REPLICAS", 1), ingress=r.str("INGRESS", "auto"))
        return cls(group=group, scaling=scaling, api=api, embedded=embedded)


class _Reader:
    """Typed reads of BDLORA_* variables; a malformed value names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, key: str) -> str | None:
        v = self.env.get(ENV_PREFIX + key)
        return None if v is None or v.strip() == "" else v.strip()

    def str(self, key: str, default: str) -> str:
        v = self._raw(key)
        return default if v is None else v

    def _parsed(self, key: str, default: Any, parse: Any, what: str) -> Any:
        v = self._raw(key)
        try:
            return default if v is None else parse(v)
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{key}={v!r} is not {what}") from None

    def int(self, key: str, default: int) -> int:
        return self._parsed(key, default, int, "an integer")

    def float(self, key: str, default: float) -> float:
        return self._parsed(key, default, float, "a number")

    def optional_float(self, key: str) -> float | None:
        return self._parsed(key, None, float, "a number")

    def bool(self, key: str, default: bool) -> bool:
        v = self._raw(key)
        if v is None:
            return default
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{ENV_PREFIX}{key}={v!r} is not a boolean (1/0, true/false)")


def _scalar(key: str, value: str) -> int | float | bool | str:
    """An engine setting from its text: int, then float, then true/false, else the string."""
    v = value.strip()
    for parse in (int, float):
        try:
            return parse(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if not v:
        raise ValueError(f"{key} is empty")
    return v
