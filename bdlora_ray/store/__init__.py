"""Adapter storage: the S3 format (manifest + per-rank safetensors), validation, and the store actor."""

from bdlora_ray.store.actor import AdapterStore, AdapterStoreActor, ShardBlob, StoreConfig
from bdlora_ray.store.manifest import Manifest, build_adapter_files, check_name
from bdlora_ray.store.s3 import AdapterBucket, AdapterInfo, S3Config

__all__ = ["AdapterBucket", "AdapterInfo", "AdapterStore", "AdapterStoreActor", "Manifest", "S3Config",
           "ShardBlob", "StoreConfig", "build_adapter_files", "check_name"]
