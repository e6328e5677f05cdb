"""Adapter store against a real S3 API (moto server): format, CLI, validation, cache, Ray."""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bdlora_ray.cli import main as cli
from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import AdapterInvalid, AdapterNameInvalid, AdapterNotFound, AdapterUnavailable
from bdlora_ray.lora.layout import TARGETS
from bdlora_ray.lora.shard import AdapterMeta, AdapterShards, expected_shard_shapes, load_peft_adapter, shard_adapter
from bdlora_ray.store import (AdapterBucket, AdapterStore, AdapterStoreActor, S3Config, ShardBlob, StoreConfig,
                              check_name)
from bdlora_ray.store.manifest import MANIFEST, Manifest, ShardFile, build_adapter_files, sha256_hex

CFG = LlamaConfig.from_name("tiny")
TP = 2
URI = "s3://adapters/team"


@pytest.fixture(scope="module")
def bucket(s3_server) -> AdapterBucket:
    s3_server.create_bucket("adapters")
    return AdapterBucket(URI)


def random_shards(rank: int, seed: int, tp: int = TP, cfg: LlamaConfig = CFG, targets=TARGETS,
                  dtype=torch.float32) -> AdapterShards:
    meta = AdapterMeta(mode="bd", tp=tp, rank=rank, alpha=2.0 * rank, scale=2.0, targets=targets,
                       num_layers=cfg.num_layers, base_model=cfg.name, block_targets=targets)
    g = torch.Generator().manual_seed(seed)
    return AdapterShards(meta, [{k: torch.randn(s, generator=g).to(dtype)
                                 for k, s in expected_shard_shapes(cfg, meta, i).items()} for i in range(tp)])


def reseal(m: Manifest, blobs: list[bytes], **changes) -> tuple[Manifest, list[bytes]]:
    """The manifest with sizes and hashes of `blobs`: the files are what the manifest promises."""
    files = tuple(ShardFile(f.name, len(b), sha256_hex(b)) for f, b in zip(m.files, blobs))
    return dataclasses.replace(m, files=files, **changes), blobs


def upload(bucket: AdapterBucket, name: str, shards: AdapterShards, cfg: LlamaConfig = CFG) -> Manifest:
    m, blobs = build_adapter_files(shards, cfg)
    bucket.upload_adapter(name, m, blobs)
    return m


def make_store(**kw) -> AdapterStore:
    return AdapterStore(StoreConfig(URI, CFG, TP, **kw))


def wait_until(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def assert_shard_equal(blob: ShardBlob, want: dict[str, torch.Tensor]) -> None:
    got = blob.tensors()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ---- names -------------------------------------------------------------------

BAD_NAMES = ["../x", "a/b", "%2e%2e", "..", "a..b", ".hidden", "-x", "ünïcode", "名前", "", "x" * 129,
             "name\n", " a", "a b", "a\\b", "a\x00b", None, 7]


@pytest.fixture(scope="module")
def idle_store(bucket) -> AdapterStore:
    return make_store()


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_rejected_before_any_request(bucket, idle_store, name):
    store = idle_store  # shared: its counters must stay at zero through every bad name
    for call in (lambda: check_name(name), lambda: store.get_shard(name, 0), lambda: store.manifest(name),
                 lambda: bucket.key(name, MANIFEST)):
        with pytest.raises(AdapterNameInvalid) as e:
            call()
        assert e.value.http_status == 400
    assert store.stats()["manifest_fetches"] == 0 and store.stats()["downloads"] == 0


@pytest.mark.parametrize("name", ["a", "A-b_c.9", "x" * 128, "llama3.1-8b_v2"])
def test_good_names_pass(name):
    assert check_name(name) == name


@pytest.mark.parametrize("uri", ["s3://adapters/team/../x", "s3://adapters//x", "s3://adapters/./x", "s3:///x",
                                 "http://adapters/x"])
def test_bad_store_uris(uri):
    with pytest.raises(ValueError):
        AdapterBucket(uri, client=object())


# ---- format, per-rank downloads, cache -----------------------------------------

def test_each_rank_downloads_only_its_own_shard(bucket):
    shards = random_shards(16, seed=1)
    m = upload(bucket, "per-rank", shards)
    assert m.files[0].size != 0 and {f.name for f in m.files} == {"rank-0-of-2.safetensors", "rank-1-of-2.safetensors"}
    store = make_store()
    assert_shard_equal(store.get_shard("per-rank", 1), shards.ranks[1])
    assert store.stats()["bytes_by_rank"] == {1: m.files[1].size}
    assert_shard_equal(store.get_shard("per-rank", 0), shards.ranks[0])
    assert_shard_equal(store.get_shard("per-rank", 1), shards.ranks[1])  # a hit: no new download
    s = store.stats()
    assert s["bytes_by_rank"] == {0: m.files[0].size, 1: m.files[1].size}
    assert (s["downloads"], s["hits"], s["manifest_fetches"]) == (2, 1, 1)
    blob = store.get_shard("per-rank", 0)
    assert blob.meta == shards.meta and blob.meta.scale == 2.0


def test_bf16_shards_keep_their_dtype(bucket):
    shards = random_shards(8, seed=2, dtype=torch.bfloat16)
    upload(bucket, "bf16", shards)
    got = make_store().get_shard("bf16", 0).tensors()
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert all(torch.equal(got[k], v) for k, v in shards.ranks[0].items())


def test_host_cache_is_lru_bounded_in_bytes(bucket):
    shards = {f"lru{i}": random_shards(8, seed=10 + i) for i in range(4)}
    for name, s in shards.items():
        upload(bucket, name, s)
    one = ShardBlob.pack("x", 0, shards["lru0"].meta, shards["lru0"].ranks[0]).nbytes
    store = make_store(cache_bytes=3 * one + one // 2)
    for name in ("lru0", "lru1", "lru2", "lru0", "lru3"):  # lru0 touched again: lru1 is the oldest
        store.get_shard(name, 0)
    assert store.cached() == [("lru2", 0), ("lru0", 0), ("lru3", 0)]
    s = store.stats()
    assert (s["downloads"], s["hits"], s["evictions"], s["cached_shards"]) == (4, 1, 1, 3)
    assert s["cached_bytes"] == 3 * one <= store.config.cache_bytes
    assert_shard_equal(store.get_shard("lru1", 0), shards["lru1"].ranks[0])  # fetched again
    assert store.stats()["downloads"] == 5


def _gate(store: AdapterStore, fail: Exception | None = None) -> tuple[threading.Event, list[str]]:
    """Hold every shard download until the returned event is set; optionally fail it then."""
    release, calls, real = threading.Event(), [], store.bucket.get

    def get(name, file, *args, **kw):
        if file == MANIFEST:
            return real(name, file, *args, **kw)
        calls.append(file)
        assert release.wait(20)
        if fail is not None:
            raise fail
        return real(name, file, *args, **kw)

    store.bucket.get = get
    return release, calls


@pytest.mark.parametrize("n", [2, 8])
def test_concurrent_cold_loads_share_one_download(bucket, n):
    shards = random_shards(16, seed=30)
    m = upload(bucket, f"flight{n}", shards)
    store = make_store()
    release, calls = _gate(store)
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(store.get_shard, f"flight{n}", 1) for _ in range(n)]
        wait_until(lambda: store.stats()["coalesced"] >= n - 1)  # everyone is waiting on one download
        release.set()
        blobs = [f.result() for f in futures]
    assert calls == ["rank-1-of-2.safetensors"]
    assert store.stats()["bytes_by_rank"] == {1: m.files[1].size}
    assert all(b is blobs[0] for b in blobs)
    assert_shard_equal(blobs[0], shards.ranks[1])


def test_a_failed_cold_load_fails_every_waiter_and_caches_nothing(bucket):
    upload(bucket, "flaky", random_shards(8, seed=31))
    store = make_store()
    release, calls = _gate(store, fail=AdapterUnavailable("store timed out"))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(store.get_shard, "flaky", 0) for _ in range(4)]
        wait_until(lambda: store.stats()["coalesced"] >= 3)
        release.set()
        errors = [f.exception() for f in futures]
    assert len(calls) == 1 and all(e is errors[0] for e in errors)
    assert isinstance(errors[0], AdapterUnavailable) and store.cached() == []
    del store.bucket.get  # the store recovers once S3 does
    store.get_shard("flaky", 0)
    assert store.cached() == [("flaky", 0)] and store.stats()["failures"] == 1


# ---- validation -----------------------------------------------------------------

def _flip(b: bytes, at: int) -> bytes:
    return b[:at] + bytes([b[at] ^ 0x01]) + b[at + 1:]


def _poison(shards: AdapterShards, key: str, value: float) -> AdapterShards:
    ranks = [dict(r) for r in shards.ranks]
    ranks[0][key] = ranks[0][key].clone()
    ranks[0][key][0, 0] = value
    return AdapterShards(shards.meta, ranks)


def _without(shards: AdapterShards, key: str) -> AdapterShards:
    ranks = [dict(r) for r in shards.ranks]
    del ranks[0][key]
    return AdapterShards(shards.meta, ranks)


def _case(kind: str) -> tuple[Manifest | None, list[bytes] | None, bytes | None]:
    """(manifest, shard files, raw manifest override) of a broken adapter of one kind."""
    good = random_shards(8, seed=40)
    m, blobs = build_adapter_files(good, CFG)
    if kind == "truncated":
        return m, [blobs[0][:-100], blobs[1]], None
    if kind == "flipped-byte":
        return m, [_flip(blobs[0], len(blobs[0]) - 7), blobs[1]], None
    if kind == "flipped-header-byte":  # hash updated too: the header itself must be caught
        return (*reseal(m, [blobs[0][:8] + b"[" + blobs[0][9:], blobs[1]]), None)
    if kind == "wrong-shapes":  # rank-16 tensors under a rank-8 manifest
        m16, b16 = build_adapter_files(random_shards(16, seed=41), CFG)
        return (*reseal(m16, b16, meta=good.meta), None)
    if kind == "other-base":  # shards cut for a model of other shapes
        other = CFG.with_(intermediate_size=CFG.intermediate_size * 2)
        return (*build_adapter_files(random_shards(8, seed=42, cfg=other), other), None)
    if kind == "other-base-name":
        other = CFG.with_(name="tiny-instruct")
        return (*build_adapter_files(random_shards(8, seed=42, cfg=other), other), None)
    if kind == "other-tp":
        return (*build_adapter_files(random_shards(8, seed=43, tp=4), CFG), None)
    if kind == "rank-too-big":
        return (*build_adapter_files(random_shards(128, seed=44), CFG), None)
    if kind == "nan":
        return (*build_adapter_files(_poison(good, "layers.1.v_proj.lora_B", float("nan")), CFG), None)
    if kind == "inf":
        return (*build_adapter_files(_poison(good, "layers.0.q_proj.lora_A", float("-inf")), CFG), None)
    if kind == "missing-key":
        return (*build_adapter_files(_without(good, "layers.1.down_proj.lora_A"), CFG), None)
    if kind == "dtype-lies":
        return (*reseal(*build_adapter_files(random_shards(8, seed=45, dtype=torch.float16), CFG), dtype="F32"), None)
    if kind == "html":
        page = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>\n"
        return (*reseal(m, [page, blobs[1]]), None)
    if kind == "lfs-pointer":
        ptr = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 104857\n"
        return (*reseal(m, [ptr, blobs[1]]), None)
    if kind == "header-bomb":
        return (*reseal(m, [(1 << 60).to_bytes(8, "little") + blobs[0][8:], blobs[1]]), None)
    if kind == "overlapping-tensors":
        n = int.from_bytes(blobs[0][:8], "little")
        header = blobs[0][8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1)
        body = blobs[0][:8] + header + blobs[0][8 + n:]
        return (*reseal(m, [body, blobs[1]]), None)
    if kind == "manifest-not-json":
        return None, None, b"<Error><Code>AccessDenied</Code></Error>"
    if kind == "manifest-future-version":
        return None, None, m.to_json().replace(b'"format_version": 1', b'"format_version": 99')
    if kind == "manifest-bad-file-name":
        return None, None, m.to_json().replace(b"rank-0-of-2", b"../../etc/passwd")
    if kind == "missing-file":
        return m, [None, blobs[1]], None
    raise AssertionError(kind)


INVALID = {
    "truncated": "bytes, expected", "flipped-byte": "sha256", "flipped-header-byte": "header",
    "wrong-shapes": "shape", "other-base": "other shapes", "other-base-name": "tiny-instruct",
    "other-tp": "TP degree 4", "rank-too-big": "exceeds", "nan": "NaN", "inf": "Inf",
    "missing-key": "missing tensors", "dtype-lies": "manifest says F32", "html": "HTML",
    "lfs-pointer": "git-LFS", "header-bomb": "out of bounds", "overlapping-tensors": "data_offsets",
    "manifest-not-json": "not valid JSON", "manifest-future-version": "version 99",
    "manifest-bad-file-name": "files[0]", "missing-file": "missing",
}


@pytest.mark.parametrize("kind", list(INVALID))
def test_invalid_adapter_is_a_typed_error_and_nothing_is_cached(bucket, kind):
    name = f"bad-{kind}"
    m, blobs, raw = _case(kind)
    if raw is not None:
        bucket.put(name, MANIFEST, raw)
    else:
        for f, data in zip(m.files, blobs):
            if data is not None:
                bucket.put(name, f.name, data)
        bucket.put(name, MANIFEST, m.to_json())
    good = random_shards(8, seed=46)
    upload(bucket, f"good-for-{kind}", good)
    store = make_store(max_rank=64)
    for attempt in range(2):  # the second attempt proves the manifest was not cached either
        with pytest.raises(AdapterInvalid, match=re.escape(INVALID[kind])) as e:
            store.get_shard(name, 0)
        assert e.value.http_status == 422
        assert store.cached() == [] and store.stats()["manifest_fetches"] == attempt + 1
    assert_shard_equal(store.get_shard(f"good-for-{kind}", 0), good.ranks[0])
    listed = {i.name: i for i in store.list_adapters()}
    assert listed[f"good-for-{kind}"].error is None
    if raw is not None or kind in ("other-base", "other-base-name", "other-tp", "rank-too-big"):
        assert listed[name].error  # manifest-level problems show in the listing


def test_missing_adapter_is_not_found(bucket):
    store = make_store()
    with pytest.raises(AdapterNotFound) as e:
        store.get_shard("never-pushed", 0)
    assert e.value.http_status == 404 and store.cached() == []


def test_unreachable_store_is_unavailable(s3_server):
    from env_vars import patched_env

    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with patched_env({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}):
        store = make_store(s3=S3Config(max_attempts=1, connect_timeout_s=1.0))
    with pytest.raises(AdapterUnavailable) as e:
        store.get_shard("anything", 0)
    assert e.value.http_status == 503


# ---- CLI --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """A random HF checkpoint of the tiny preset, a PEFT BD-LoRA (nblocks=2) and an ordinary LoRA."""
    from reference import make_adapter, make_checkpoint

    d = tmp_path_factory.mktemp("peft")
    ckpt = make_checkpoint(CFG, d / "base")
    return {"ckpt": ckpt,
            "bd": make_adapter(ckpt, d / "bd", rank=8, nblocks=2, seed=3),
            "lora": make_adapter(ckpt, d / "lora", rank=8, targets=["q_proj", "v_proj", "down_proj"], seed=4)}


def test_cli_push_then_ls(bucket, peft_adapters, capsys):
    lora = str(peft_adapters["lora"])
    assert cli(["push", str(peft_adapters["bd"]), f"{URI}/cli-bd", "--tp", "2", "--base", "tiny", "-q"]) == 0
    assert cli(["push", lora, f"{URI}/cli-slora", "--tp", "2", "--mode", "slora", "--base", "tiny", "-q"]) == 0
    assert cli(["push", lora, f"{URI}/cli-repl", "--tp", "2", "--base", "tiny", "-q"]) == 0
    for bad in (f"{URI}/../evil", f"{URI}/a%2Fb", f"{URI}/.x", "s3://adapters"):
        assert cli(["push", lora, bad, "--tp", "2", "--base", "tiny", "-q"]) == 2
    assert cli(["push", lora, f"{URI}/cli-x", "--tp", "3", "--base", "tiny", "-q"]) == 2  # 3 does not divide tiny
    capsys.readouterr()
    assert cli(["ls", URI]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["cli-bd"][1:4] == ["8", "bd", "2"]
    assert rows["cli-slora"][1:4] == ["8", "slora", "2"]
    assert rows["cli-repl"][1:4] == ["8", "replicated", "2"]
    assert "cli-x" not in rows
    store = make_store()
    for name, path, mode in (("cli-bd", "bd", "bd"), ("cli-slora", "lora", "slora"), ("cli-repl", "lora", "replicated")):
        want = shard_adapter(load_peft_adapter(peft_adapters[path]), CFG, TP, mode)
        for rank in range(TP):
            blob = store.get_shard(name, rank)
            assert blob.meta == want.meta
            assert_shard_equal(blob, want.ranks[rank])


# ---- through Ray -------------------------------------------------------------------

def test_ray_workers_each_get_only_their_shard_zero_copy(ray_session, s3_server, bucket):
    import ray

    shards = random_shards(32, seed=50)
    m = upload(bucket, "via-ray", shards)
    store = AdapterStoreActor.options(runtime_env={"env_vars": s3_server.env}).remote(StoreConfig(URI, CFG, TP))

    @ray.remote(num_cpus=0)
    def tp_worker(store, rank):
        blob = ray.get(store.get_shard.remote("via-ray", rank))
        # Read-only means the buffer is mapped from the object store, not copied out of it.
        return blob.buffer.flags.writeable, {k: t.clone() for k, t in blob.tensors().items()}

    results = ray.get([tp_worker.remote(store, r) for r in range(TP)])
    for rank, (writeable, tensors) in enumerate(results):
        assert not writeable
        assert tensors.keys() == shards.ranks[rank].keys()
        assert all(torch.equal(tensors[k], v) for k, v in shards.ranks[rank].items())
    stats = ray.get(store.stats.remote())
    assert stats["bytes_by_rank"] == {r: m.files[r].size for r in range(TP)} and stats["downloads"] == TP
    with pytest.raises(AdapterNameInvalid):
        ray.get(store.get_shard.remote("../via-ray", 0))
    with pytest.raises(AdapterNotFound):
        ray.get(store.get_shard.remote("not-there", 0))
    ray.kill(store)


# ---- end to end: push -> store -> 2-rank pools -> TP model == HF + PEFT --------------

E2E_TOL = 1e-4  # float32 on CPU; the same bound as the model tests


def _serve_rank(rank: int, world: int, init_file: str, checkpoint: str, names: list[str],
                seqs: list[tuple[str | None, list[int]]], out_dir: str) -> None:
    """One TP rank: fetch ONLY its shards from the store, page them into its pool, run the model."""
    import json
    import os

    from safetensors.torch import save_file

    from bdlora_ray.attention import AttentionMeta
    from bdlora_ray.comm import end_spawned_rank, init_distributed, leave_world
    from bdlora_ray.lora.batch import LoraBatch
    from bdlora_ray.memory import PagePool, PoolConfig
    from bdlora_ray.tp import TPModel

    torch.set_num_threads(1)
    comm = init_distributed(rank, world, f"file://{init_file}")
    store = make_store()  # reaches moto through the AWS_* variables this process inherited
    pool = PagePool(PoolConfig.for_model(CFG, world, num_pages=256))
    for i, name in enumerate(names):
        pool.allocate_kv(f"filler-{i}", 16 * (i + 1))  # KV blocks between adapters: pages not contiguous
        blob = store.get_shard(name, rank)
        pool.load_adapter(name, blob.tensors(), blob.meta)
    model = TPModel(CFG, checkpoint, comm)

    def forward(batch):
        used = sorted({n for n, _ in batch if n is not None})
        ids = torch.tensor([t for _, p in batch for t in p])
        pos = torch.cat([torch.arange(len(p)) for _, p in batch])
        idx = torch.cat([torch.full((len(p),), used.index(n) if n else -1) for n, p in batch])
        lora = LoraBatch.build([pool.adapter(n) for n in used], idx, pool.data, CFG, rank, world) if used else None
        return model.forward(ids, pos, AttentionMeta([len(p) for _, p in batch]), lora)

    out = {f"single.{i}": forward([s]) for i, s in enumerate(seqs)}
    out["batch"] = forward(seqs)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"stats": store.stats(), "pages": {n: pool.adapter(n).pages.tolist() for n in names}}, f)
    leave_world(barrier=True)
    end_spawned_rank()


def test_pushed_adapters_served_from_two_rank_pools_equal_peft(bucket, peft_adapters, tmp_path):
    import json

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from reference import hf_logits

    bd, lora, ckpt = str(peft_adapters["bd"]), str(peft_adapters["lora"]), str(peft_adapters["ckpt"])
    pushes = {"e2e-bd": (bd, []), "e2e-slora": (lora, ["--mode", "slora"]), "e2e-repl": (lora, ["--mode", "replicated"])}
    for name, (path, extra) in pushes.items():
        assert cli(["push", path, f"{URI}/{name}", "--tp", "2", "--base", "tiny", "-q", *extra]) == 0
    g = torch.Generator().manual_seed(5)
    p1, p2 = (torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (7, 5))
    seqs = [("e2e-bd", p1), ("e2e-slora", p2), (None, p1), ("e2e-repl", p2), (None, p2)]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_serve_rank, args=(2, str(tmp_path / "init"), ckpt, list(pushes), seqs, str(out_dir)),
             nprocs=2, join=True)
    ranks = [load_file(str(out_dir / f"rank{r}.safetensors")) for r in range(2)]
    info = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]

    manifests = {n: AdapterBucket(URI).manifest(n) for n in pushes}
    for r in range(2):  # each rank downloaded exactly its own files, nothing of the other rank's
        assert info[r]["stats"]["bytes_by_rank"] == {str(r): sum(m.files[r].size for m in manifests.values())}
    adapter_dir = {"e2e-bd": bd, "e2e-slora": lora, "e2e-repl": lora, None: None}
    refs: dict = {}  # (adapter dir, prompt) -> HF + PEFT logits; each costs a model load
    row = 0
    for i, (name, p) in enumerate(seqs):
        key = (adapter_dir[name], tuple(p))
        if key not in refs:
            refs[key] = hf_logits(peft_adapters["ckpt"], torch.tensor(p), adapter_dir[name])
        want = refs[key]
        for r in range(2):
            diff = (ranks[r][f"single.{i}"] - want).abs().max().item()
            assert diff <= E2E_TOL, f"rank {r} seq {i} ({name}): max abs diff {diff:.2e} vs HF+PEFT"
            diff = (ranks[r]["batch"][row:row + len(p)] - want).abs().max().item()
            assert diff <= E2E_TOL, f"rank {r} seq {i} ({name}) in the mixed batch: {diff:.2e}"
        row += len(p)
    for name, p in seqs:  # every adapter really changes the output, so the comparisons have teeth
        if name is not None:
            assert (refs[(adapter_dir[name], tuple(p))] - refs[(None, tuple(p))]).abs().max() > 100 * E2E_TOL
