"""Pushing an adapter: a PEFT adapter directory -> per-rank shards + manifest in the store.

What `bdlora push` does, callable (the demo seeding and the benchmarks push
many adapters this way). Needs no Ray: pushing runs on a laptop.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from bdlora_ray.config import PRESETS, LlamaConfig
from bdlora_ray.lora.shard import load_peft_adapter, shard_adapter
from bdlora_ray.store.manifest import Manifest, build_adapter_files, check_name
from bdlora_ray.store.s3 import AdapterBucket


def resolve_base(base: str) -> LlamaConfig:
    """A preset name, or a directory (or file) holding an HF `config.json`."""
    if base in PRESETS:
        return LlamaConfig.from_name(base)
    path = Path(base)
    if (path.is_dir() and (path / "config.json").is_file()) or path.is_file():
        return LlamaConfig.from_json(path)
    raise ValueError(f"--base {base!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     "nor a directory with config.json")


def split_target(uri: str) -> tuple[str, str]:
    """'s3://bucket/prefix/name' -> ('s3://bucket/prefix', 'name'), the name checked."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if not head.startswith("s3://") or head == "s3:/":
        raise ValueError(f"expected s3://bucket[/prefix]/<name>, got {uri!r}")
    return head, check_name(name)


def push_adapter(peft_dir: str | Path, dest: str, tp: int, mode: str | None = None, base: str | None = None,
                 bucket: AdapterBucket | None = None, quiet: bool = True) -> Manifest:
    """Convert the PEFT adapter at `peft_dir` and upload it to `dest` (s3://bucket/prefix/<name>).
    `mode` defaults to bd for a BD-LoRA adapter, replicated otherwise; `base` (a preset or an HF
    model directory) to the adapter's base model. `bucket`, if given, must be `dest`'s store
    (callers pushing many adapters share one S3 client)."""
    store_uri, name = split_target(dest)
    if bucket is None:
        bucket = AdapterBucket(store_uri)  # a bad URI fails before any conversion work
    elif bucket.uri != store_uri.rstrip("/"):
        raise ValueError(f"bucket {bucket.uri} is not the store of {dest}")
    adapter = load_peft_adapter(peft_dir, name=name)
    base = base or adapter.base_model
    if not base:
        raise ValueError("the adapter names no base model; pass --base PRESET_OR_DIR")
    cfg = resolve_base(base)
    shards = shard_adapter(adapter, cfg, tp, mode)
    manifest, blobs = build_adapter_files(shards, cfg)
    with tqdm(total=sum(map(len, blobs)), unit="B", unit_scale=True, desc=name, disable=quiet) as bar:
        bucket.upload_adapter(name, manifest, blobs, progress=bar.update)
    return manifest
