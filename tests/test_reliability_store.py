"""Reliability of the adapter store without Ray (issue 8): bounded S3 retries, no mixing of two
versions of an adapter after a failed load, and nothing but safetensors and JSON ever loaded.

The store talks to the test S3 server through `S3Proxy`, which counts what S3 saw and injects faults.
"""

from __future__ import annotations

import dataclasses
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import AdapterInvalid, AdapterUnavailable
from bdlora_ray.lora.peft import load_peft_adapter
from bdlora_ray.lora.shard import AdapterShards, shard_adapter
from bdlora_ray.store import AdapterBucket, AdapterStore, S3Config, StoreConfig
from bdlora_ray.store.manifest import MANIFEST, ShardFile, build_adapter_files
from bdlora_ray.synthetic import random_adapter, write_peft_adapter
from s3_proxy import S3Proxy
from env_vars import patched_env
from serving_fixtures import wait_until

CFG = LlamaConfig.from_name("tiny")
TP = 2
PREFIX = "rel"
URI = f"s3://reliability-store/{PREFIX}"


class Unpickled(Exception):
    """Raised by anything that would deserialise pickle data."""


def shards(seed: int, rank: int = 8) -> AdapterShards:
    return shard_adapter(random_adapter(CFG, rank, seed=seed), CFG, TP, "replicated")


def key(name: str, file: str = MANIFEST) -> str:
    return f"{PREFIX}/{name}/{file}"


@pytest.fixture(scope="module")
def bucket(s3_server) -> AdapterBucket:
    s3_server.create_bucket("reliability-store")
    return AdapterBucket(URI)  # straight to the S3 server


@pytest.fixture()
def proxy(s3_server, bucket):
    p = S3Proxy(s3_server.endpoint)
    yield p
    p.stop()


def store_via(proxy: S3Proxy, attempts: int = 3) -> AdapterStore:
    with patched_env({"AWS_ENDPOINT_URL": proxy.endpoint}):  # boto3 reads it when the client is made
        return AdapterStore(StoreConfig(URI, CFG, TP, s3=S3Config(max_attempts=attempts, connect_timeout_s=1.0)))


def upload(bucket: AdapterBucket, name: str, s: AdapterShards) -> None:
    m, blobs = build_adapter_files(s, CFG)
    bucket.upload_adapter(name, m, blobs)


@pytest.mark.parametrize("attempts", [1, 3])
def test_throttled_s3_is_tried_exactly_max_attempts_times_then_unavailable(bucket, proxy, attempts):
    upload(bucket, f"throttled-{attempts}", shards(seed=1))
    store = store_via(proxy, attempts)
    fault = proxy.fault(lambda method, k: k == key(f"throttled-{attempts}"), "slowdown")
    with pytest.raises(AdapterUnavailable, match="SlowDown") as e:
        store.get_shard(f"throttled-{attempts}", 0)
    assert e.value.http_status == 503 and e.value.retry_after_s > 0
    assert proxy.gets(key(f"throttled-{attempts}")) == fault.hits == attempts  # bounded: no more, no fewer
    assert store.cached() == []
    proxy.clear()
    store.get_shard(f"throttled-{attempts}", 0)  # S3 is back: the same store recovers
    assert store.cached() == [(f"throttled-{attempts}", 0)]


def test_unreachable_s3_is_unavailable_and_the_store_recovers(bucket, proxy):
    upload(bucket, "unreachable", shards(seed=2))
    store = store_via(proxy)
    proxy.down()
    with pytest.raises(AdapterUnavailable, match="unreachable"):
        store.get_shard("unreachable", 1)
    proxy.up()
    store.get_shard("unreachable", 1)
    assert store.cached() == [("unreachable", 1)]


def _flip(b: bytes, at: int) -> bytes:
    return b[:at] + bytes([b[at] ^ 0x01]) + b[at + 1:]


def test_a_load_in_flight_when_its_sibling_shard_fails_never_mixes_versions(bucket, proxy):
    """Rank 0's good shard is still downloading when rank 1's corrupt one fails; the adapter is
    then pushed again with other weights. Rank 0 must get the new version, not a cached old one."""
    v1, v2 = shards(seed=3), shards(seed=4)
    m, blobs = build_adapter_files(v1, CFG)
    bucket.put("mixed", m.files[0].name, blobs[0])
    bucket.put("mixed", m.files[1].name, _flip(blobs[1], len(blobs[1]) - 5))
    bucket.put("mixed", MANIFEST, m.to_json())
    store = store_via(proxy)
    held = proxy.fault(lambda method, k: k == key("mixed", m.files[0].name), "forward", hold=True)
    with ThreadPoolExecutor(2) as pool:
        rank0 = pool.submit(store.get_shard, "mixed", 0)
        wait_until(lambda: held.hits == 1, 20, "rank 0's download to start")
        with pytest.raises(AdapterInvalid, match="sha256"):
            store.get_shard("mixed", 1)
        held.release.set()
        assert torch.equal(rank0.result(timeout=30).tensors()["layers.0.q_proj.lora_A"],
                           v1.ranks[0]["layers.0.q_proj.lora_A"])  # the caller gets what it asked for
    assert store.cached() == []  # but nothing of the failed adapter is kept
    upload(bucket, "mixed", v2)
    for rank in range(TP):
        got = store.get_shard("mixed", rank).tensors()
        assert all(torch.equal(got[k], v2.ranks[rank][k]) for k in v2.ranks[rank]), f"rank {rank} is stale"


def test_a_stale_cached_shard_is_not_served_once_the_manifest_changed(bucket, proxy):
    """The manifest cache forgot the adapter (LRU) while its shard stayed cached, and it was pushed
    again meanwhile: the cached shard of the old version must not be served."""
    upload(bucket, "repushed", shards(seed=5))
    store = store_via(proxy)
    store.get_shard("repushed", 0)
    v2 = shards(seed=6)
    upload(bucket, "repushed", v2)
    with store._lock:
        store._manifests.clear()  # what max_manifests does to a long-unused adapter
    got = store.get_shard("repushed", 0).tensors()
    assert all(torch.equal(got[k], v2.ranks[0][k]) for k in v2.ranks[0])
    before = proxy.gets(key("repushed", "rank-0-of-2.safetensors"))
    store.get_shard("repushed", 0)  # the new version is cached now: no download
    with store._lock:
        store._manifests.clear()
    store.get_shard("repushed", 0)  # manifest read again, same version: the cached shard is good
    assert proxy.gets(key("repushed", "rank-0-of-2.safetensors")) == before


class _Payload:
    """Unpickling it creates `marker`: proof that something ran pickle on it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def no_pickle(monkeypatch):
    """Every pickle entry point (and the loaders built on it) raises instead."""

    def refuse(*args, **kwargs):
        raise Unpickled("pickle data was loaded")

    for obj, attr in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(obj, attr, refuse)


def test_only_safetensors_and_json_are_loaded(bucket, proxy, tmp_path, no_pickle):
    """A pickle beside the adapter, in S3 and in the PEFT directory, is never read or unpickled:
    a full push-side parse and a full store load of every rank succeed with pickle disabled."""
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Payload(str(marker)))  # made before `no_pickle` matters: dumps is allowed
    peft_dir = write_peft_adapter(random_adapter(CFG, 8, seed=7, name="with-pickle"), tmp_path / "peft")
    (peft_dir / "adapter_model.bin").write_bytes(evil)  # PEFT's pickled format, next to the safetensors
    adapter = load_peft_adapter(peft_dir, "with-pickle")
    upload(bucket, "with-pickle", shard_adapter(adapter, CFG, TP, "replicated"))
    for extra in ("adapter_model.bin", "rank-0-of-2.pt", "evil.pkl"):
        bucket.put("with-pickle", extra, evil)
    store = store_via(proxy)
    for rank in range(TP):
        assert store.get_shard("with-pickle", rank).tensors()
    assert {s.key for s in proxy.log()} == {key("with-pickle", f) for f in
                                            (MANIFEST, "rank-0-of-2.safetensors", "rank-1-of-2.safetensors")}
    assert not marker.exists()


def test_a_manifest_cannot_point_the_store_at_another_file(bucket, proxy):
    m, blobs = build_adapter_files(shards(seed=8), CFG)
    bucket.put("redirect", "evil.pkl", blobs[0])
    files = (ShardFile("evil.pkl", m.files[0].size, m.files[0].sha256), m.files[1])
    bucket.put("redirect", MANIFEST, dataclasses.replace(m, files=files).to_json())
    bucket.put("redirect", m.files[1].name, blobs[1])
    store = store_via(proxy)
    with pytest.raises(AdapterInvalid, match="files\\[0\\]"):
        store.get_shard("redirect", 0)
    assert proxy.gets(key("redirect", "evil.pkl")) == 0


def test_concurrent_waiters_of_a_failing_load_share_its_one_error(bucket, proxy):
    upload(bucket, "fan-out", shards(seed=9))
    store = store_via(proxy)
    fault = proxy.fault(lambda method, k: k == key("fan-out", "rank-0-of-2.safetensors"), "slowdown", hold=True)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(store.get_shard, "fan-out", 0) for _ in range(6)]
        wait_until(lambda: store.stats()["coalesced"] == 5, 20, "every caller to join the one load")
        fault.release.set()
        errors = [f.exception(timeout=60) for f in futures]
    assert isinstance(errors[0], AdapterUnavailable) and all(e is errors[0] for e in errors)
    assert proxy.gets(key("fan-out", "rank-0-of-2.safetensors")) == 3  # one load, its bounded retries


def test_proxy_forwards_unchanged_bytes(bucket, proxy):
    """The fault proxy itself: what passes through it is byte-identical (the tests above rely on it)."""
    data = bytes(range(256)) * 300
    bucket.put("bytes", "blob.bin", data)
    via = store_via(proxy).bucket
    assert via.get("bytes", "blob.bin", 1 << 20) == data
    assert [(s.method, s.key, s.status) for s in proxy.log()] == [("GET", key("bytes", "blob.bin"), 200)]
