"""Adapter storage: the S3 format (manifest + per-rank safetensors), validation, pushing, and the store actor.

Importing the package needs no Ray (`bdlora push` runs without it): the
store actor's module, which imports Ray, loads on first use of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bdlora_ray.store.manifest import Manifest, build_adapter_files, check_name
from bdlora_ray.store.push import push_adapter
from bdlora_ray.store.s3 import AdapterBucket, AdapterInfo, S3Config

if TYPE_CHECKING:
    from bdlora_ray.store.actor import AdapterStore, AdapterStoreActor, ShardBlob, StoreConfig

_ACTOR_NAMES = ("AdapterStore", "AdapterStoreActor", "ShardBlob", "StoreConfig")


def __getattr__(name: str) -> Any:
    if name in _ACTOR_NAMES:
        return getattr(importlib.import_module("bdlora_ray.store.actor"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AdapterBucket", "AdapterInfo", "AdapterStore", "AdapterStoreActor", "Manifest", "S3Config",
           "ShardBlob", "StoreConfig", "build_adapter_files", "check_name", "push_adapter"]
