"""Reliability and security of the served application, end to end over HTTP (issue 8).

ONE application (module fixture) serves the tiny Llama at TP=2 in one replica group, exactly as
`serve run deploy:app` does; its adapter store reaches the test S3 server through `S3Proxy`,
which records every request S3 saw and injects faults (S3 down, 503 SlowDown, held downloads).
Tests upload adapters straight to the S3 server. Requests are greedy with a few tokens, so the
same request always has the same output: that is the reference outputs are compared with.

The tests run in file order; the last ones kill TP workers (the group is rebuilt in place).
The table in docs/RELIABILITY.md lists each case and the behaviour these tests pin down.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from bdlora_ray.config import LlamaConfig
from bdlora_ray.group import STORE_NAMESPACE, store_actor_name
from bdlora_ray.lora.shard import AdapterShards, shard_adapter
from bdlora_ray.store import AdapterBucket
from bdlora_ray.store.manifest import MANIFEST, Manifest, ShardFile, build_adapter_files, sha256_hex
from bdlora_ray.synthetic import random_adapter
from bdlora_ray.spec import EngineConfig, GroupConfig
from bdlora_ray.store.s3 import S3Config
from deploy.config import ApiConfig, AppConfig, without_credentials
from s3_proxy import S3Proxy
from serving_fixtures import assert_openai_error, drained_pool, serve_app, wait_until

pytestmark = pytest.mark.slow

BASE = "tiny-llama"
APP_NAME = "bdlora-reliability"
TOKEN = "reliability-admin-token"
TP = 2
PREFIX = "adapters"
N = 6                   # new tokens per request
PROMPT = "hello"
S3_ATTEMPTS = 3         # tries per S3 call, then 503
MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 16
MAX_QUEUE_LEN = 32      # waiting requests; past it 503 (the soak's 32 in flight always fit)
WARM = ("warm-a", "warm-b")
SOAK = tuple(f"soak-{i:02d}" for i in range(50))
SHARD_FILES = tuple(f"rank-{r}-of-{TP}.safetensors" for r in range(TP))
KEY = re.compile(rf"{PREFIX}/[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}/(manifest\.json|rank-[0-9]+-of-{TP}\.safetensors)")


# ---- adapters -------------------------------------------------------------------------------------

def adapter_shards(cfg: LlamaConfig, seed: int, rank: int = 8, bd: bool = False) -> AdapterShards:
    a = random_adapter(cfg, rank, nblocks=TP if bd else None, seed=seed)
    return shard_adapter(a, cfg, TP, "bd" if bd else "replicated")


def reseal(m: Manifest, blobs: list[bytes], **changes: Any) -> tuple[Manifest, list[bytes]]:
    """The manifest with the sizes and hashes of `blobs`: the files are what it promises."""
    files = tuple(ShardFile(f.name, len(b), sha256_hex(b)) for f, b in zip(m.files, blobs))
    return dataclasses.replace(m, files=files, **changes), blobs


def _poisoned(s: AdapterShards, value: float) -> AdapterShards:
    ranks = [dict(r) for r in s.ranks]
    key = sorted(ranks[1])[3]
    ranks[1][key] = ranks[1][key].clone()
    ranks[1][key][0, 0] = value
    return AdapterShards(s.meta, ranks)


HTML = b"<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>\n"
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"cd" * 32 + b"\nsize 52311\n"

# kind -> what the 422 message must say
CORRUPT = {
    "truncated": "bytes, expected", "flipped-byte": "sha256 mismatch", "html": "HTML", "lfs-pointer": "git-LFS",
    "wrong-shapes": "has shape", "other-base": "other shapes", "rank-above-max": "exceeds the served maximum",
    "nan": "NaN or Inf", "inf": "NaN or Inf",
}


def corrupt_files(cfg: LlamaConfig, kind: str) -> tuple[Manifest, list[bytes]]:
    good = adapter_shards(cfg, seed=900)
    m, blobs = build_adapter_files(good, cfg)
    if kind == "truncated":
        return m, [blobs[0][:-100], blobs[1]]
    if kind == "flipped-byte":  # in rank 1's file: rank 0's good shard must not be kept either
        b = blobs[1]
        return m, [blobs[0], b[:-7] + bytes([b[-7] ^ 0x01]) + b[-6:]]
    if kind == "html":
        return reseal(m, [HTML, blobs[1]])
    if kind == "lfs-pointer":
        return reseal(m, [LFS, blobs[1]])
    if kind == "wrong-shapes":  # rank-16 tensors under a rank-8 manifest
        return reseal(*build_adapter_files(adapter_shards(cfg, seed=901, rank=16), cfg), meta=m.meta)
    if kind == "other-base":
        other = cfg.with_(intermediate_size=2 * cfg.intermediate_size)
        return build_adapter_files(adapter_shards(other, seed=902), other)
    if kind == "rank-above-max":
        return build_adapter_files(adapter_shards(cfg, seed=903, rank=128), cfg)
    if kind in ("nan", "inf"):
        return build_adapter_files(_poisoned(good, float("nan") if kind == "nan" else float("inf")), cfg)
    raise AssertionError(kind)


# ---- the application ------------------------------------------------------------------------------

@dataclass
class App:
    url: str
    http: httpx.Client
    proxy: S3Proxy            # between the server and S3: what S3 saw, and faults
    bucket: AdapterBucket     # the same bucket, straight to S3 (the tests' uploads)
    cfg: LlamaConfig
    groups: Any               # DeploymentHandle of the replica group
    store: Any                # the adapter-store actor

    def key(self, name: str, file: str = MANIFEST) -> str:
        return f"{PREFIX}/{name}/{file}"

    def push(self, name: str, seed: int, rank: int = 8, bd: bool = False) -> None:
        self.bucket.upload_adapter(name, *build_adapter_files(adapter_shards(self.cfg, seed, rank, bd), self.cfg))

    def complete(self, model: str, prompt: str = PROMPT, n: int = N, **extra: Any) -> httpx.Response:
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}
        return self.http.post("/v1/completions", json=body)

    def text(self, model: str, prompt: str = PROMPT, n: int = N) -> str:
        return completion_text(self.complete(model, prompt, n), n)

    def stats(self) -> dict:
        return self.groups.stats.remote().result(timeout_s=60)

    def pool_usage(self) -> list[dict]:
        return self.groups.pool_usage.remote().result(timeout_s=60)

    def admin(self, method: str, path: str, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        return self.http.request(method, path, headers=headers, **kw)


def completion_text(r: httpx.Response, n: int = N) -> str:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == n, body
    return body["choices"][0]["text"]


def stream_events(http: httpx.Client, body: dict, on_event: Any = None) -> list[Any]:
    """The `data:` payloads of a streamed completion (JSON objects, then the literal "[DONE]")."""
    events: list[Any] = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if on_event is not None:
                    on_event(len(events))
    return events


@pytest.fixture(scope="module")
def app(ray_session, s3_server, tmp_path_factory):
    import ray
    from ray import serve

    from deploy.seed import write_checkpoint

    model = write_checkpoint(tmp_path_factory.mktemp("reliability") / BASE)
    cfg = LlamaConfig.from_json(model)
    uri = f"s3://{s3_server.create_bucket('reliability-adapters')}/{PREFIX}"
    bucket = AdapterBucket(uri)
    for i, name in enumerate(WARM + SOAK):
        bucket.upload_adapter(name, *build_adapter_files(adapter_shards(cfg, seed=100 + i, bd=i % 2 == 1), cfg))
    proxy = S3Proxy(s3_server.endpoint)
    spec = GroupConfig(model_path=str(model), adapters_uri=uri, tp=TP, worker_cpus=0.2,
                       engine=EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
                                           max_queue_len=MAX_QUEUE_LEN),
                       s3=S3Config(max_attempts=S3_ATTEMPTS, connect_timeout_s=2.0, read_timeout_s=30.0),
                       env_vars=without_credentials({**s3_server.env, "AWS_ENDPOINT_URL": proxy.endpoint}))
    config = AppConfig(group=spec, api=ApiConfig(model_name=BASE, admin_token=TOKEN))
    try:
        with serve_app(config, app_name=APP_NAME) as url, httpx.Client(base_url=url, timeout=120) as http:
            store = ray.get_actor(store_actor_name(spec), namespace=STORE_NAMESPACE)
            a = App(url, http, proxy, bucket, cfg, serve.get_deployment_handle("EngineGroup", APP_NAME), store)
            for name in WARM:  # resident in the pool before the first test
                a.text(name)
            yield a
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def refs(app) -> dict[str, str]:
    """Greedy outputs of the base model and the warm adapters, each sent alone."""
    return {m: app.text(m) for m in (BASE, *WARM)}


def assert_serving(app: App, refs: dict[str, str]) -> None:
    """The base model and the warm adapters answer, each with its reference output."""
    for m, want in refs.items():
        assert app.text(m) == want, m


# ---- 3. bad requests ------------------------------------------------------------------------------

BAD_NAMES = ["../x", "a/b", "..", "%2e%2e", "%2e%2e%2fetc", "a..b", ".hidden", "-x", "ünïcode", "名前",
             "a\x00b", "name\n", "a b", "x" * 129, "adapters/warm-a"]


def test_bad_requests_are_refused_and_never_reach_s3(app, refs):
    before = len(app.proxy.log())
    c = app.http
    ok = {"model": WARM[0], "prompt": PROMPT, "max_tokens": 2}

    def post(body: Any, path: str = "/v1/completions", **kw: Any) -> httpx.Response:
        return c.post(path, json=body, **kw) if not isinstance(body, bytes) else c.post(
            path, content=body, headers={"content-type": "application/json"}, **kw)

    cases: list[tuple[httpx.Response, int, str | None, str]] = [
        # (response, status, param, what the message must say)
        (post({**ok, "prompt": "x" * (2 * MAX_MODEL_LEN)}), 400, None, "maximum context length"),
        (post({**ok, "max_tokens": MAX_MODEL_LEN}), 400, None, "maximum context length"),
        (post({**ok, "max_tokens": 10 ** 30}), 400, "max_tokens", "less than or equal"),
        (post({**ok, "max_tokens": 0}), 400, "max_tokens", "greater than or equal to 1"),
        (post({**ok, "max_tokens": -5}), 400, "max_tokens", "greater than or equal to 1"),
        (post({**ok, "temperature": -1}), 400, "temperature", ""),
        (post({**ok, "temperature": 1e308}), 400, "temperature", ""),
        (post(b'{"model": "warm-a", "prompt": "x", "temperature": NaN}'), 400, "temperature", "finite"),
        (post(b'{"model": "warm-a", "prompt": "x", "top_p": Infinity}'), 400, "top_p", "finite"),
        (post({**ok, "top_p": 0}), 400, "top_p", ""),
        (post({**ok, "top_k": -3}), 400, "top_k", ""),
        (post({**ok, "seed": 2 ** 70}), 400, None, "64 bits"),
        (post({**ok, "stop": ["s"] * 100}), 400, None, "stop"),
        (post({**ok, "n": 17}), 400, "n", "less than or equal"),
        (post({**ok, "prompt": [10 ** 6]}), 400, None, "token ids"),
        (post({**ok, "prompt": ""}), 400, None, "empty"),
        (post(b'{"model": "warm-a", "prompt": '), 400, None, "not valid JSON"),
        (post(b"[1, 2]"), 400, None, "object"),
        (post({**ok, "prompt": "x" * (5 << 20)}), 413, None, "exceeds"),
        (post({"model": WARM[0], "messages": []}, "/v1/chat/completions"), 400, "messages", ""),
    ]
    for name in BAD_NAMES:
        cases.append((post({**ok, "model": name}), 400, None, "invalid adapter name"))
        cases.append((post({"model": name, "messages": [{"role": "user", "content": "x"}]}, "/v1/chat/completions"),
                      400, None, "invalid adapter name"))
        cases.append((app.admin("POST", "/v1/adapters", json={"name": name}), 400, None, "invalid adapter name"))
    for raw in ("%2e%2e", "%C3%BCn", "..%5Cx", "a%00b", "..."):
        cases.append((app.admin("DELETE", f"/v1/adapters/{raw}"), 400, None, "invalid adapter name"))
    for r, status, param, says in cases:
        err = assert_openai_error(r, status, param=param)
        assert says.lower() in err["message"].lower(), (r.request.content[:80], err)
    # A path separator in the URL never even matches an adapter route.
    for raw in ("..%2Fx", "a/b", "../../x"):
        assert app.admin("DELETE", f"/v1/adapters/{raw}").status_code in (404, 405)
    assert app.proxy.log()[before:] == []  # S3 saw nothing of any of it
    assert_serving(app, refs)


# ---- 8. admin token, never pickle -----------------------------------------------------------------

def test_admin_endpoints_refuse_a_missing_or_wrong_token(app):
    before, fetches = len(app.proxy.log()), app.stats()["counters"].get("adapter_fetches", 0)
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        for method, path, body in (("POST", "/v1/adapters", {"name": "warm-b"}), ("DELETE", "/v1/adapters/warm-b", None)):
            r = app.admin(method, path, token, json=body)
            assert_openai_error(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
    for header in (f"Basic {TOKEN}", "Bearer", TOKEN):
        r = app.http.post("/v1/adapters", json={"name": "warm-b"}, headers={"authorization": header})
        assert_openai_error(r, 401, "invalid_api_key")
    s = app.stats()
    assert app.proxy.log()[before:] == [] and s["counters"].get("adapter_fetches", 0) == fetches
    assert "warm-b" in s["resident_adapters"]  # the refused DELETE unloaded nothing
    assert app.admin("DELETE", "/v1/adapters/warm-b").json()["status"] == "unloaded"
    assert "warm-b" not in app.stats()["resident_adapters"]
    assert app.admin("POST", "/v1/adapters", json={"name": "warm-b"}).json()["status"] == "loaded"


class _Payload:
    """Unpickling it creates `marker`: proof that something ran pickle on it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_beside_an_adapter_are_never_read(app, tmp_path):
    marker = tmp_path / "unpickled"
    app.push("with-pickles", seed=300)
    for extra in ("adapter_model.bin", "rank-0-of-2.pt", "evil.pkl"):
        app.bucket.put("with-pickles", extra, pickle.dumps(_Payload(str(marker))))
    before = len(app.proxy.log())
    app.text("with-pickles")
    assert {s.key for s in app.proxy.log()[before:]} == {app.key("with-pickles", f)
                                                          for f in (MANIFEST, *SHARD_FILES)}
    assert not marker.exists()


# ---- 1. unknown, deleted, re-pushed adapters ------------------------------------------------------

def test_unknown_adapter_is_404_after_one_look_at_s3(app, refs):
    before = len(app.proxy.log())
    err = assert_openai_error(app.complete("never-pushed"), 404, "model_not_found")
    assert "never-pushed" in err["message"]
    assert [(s.method, s.key) for s in app.proxy.log()[before:]] == [("GET", app.key("never-pushed"))]
    assert "never-pushed" not in app.stats()["resident_adapters"]
    assert_serving(app, refs)


def test_an_adapter_deleted_from_s3_is_404_once_unloaded(app):
    app.push("gone", seed=301)
    text = app.text("gone")
    for f in (MANIFEST, *SHARD_FILES):
        app.bucket.client.delete_object(Bucket=app.bucket.bucket, Key=app.key("gone", f))
    assert app.text("gone") == text  # still resident: served from memory
    assert app.admin("DELETE", "/v1/adapters/gone").status_code == 200
    assert_openai_error(app.complete("gone"), 404, "model_not_found")


def test_a_repushed_adapter_is_served_in_its_new_version_after_unload(app):
    app.push("repushed", seed=302)
    app.push("repushed-v2-copy", seed=303)
    old = app.text("repushed")
    app.push("repushed", seed=303)  # new weights under the same name
    assert app.text("repushed") == old  # resident: the old version until it is unloaded
    assert app.admin("DELETE", "/v1/adapters/repushed").status_code == 200
    new = app.text("repushed")
    assert new != old and new == app.text("repushed-v2-copy")


# ---- 2. corrupt adapters --------------------------------------------------------------------------

def test_corrupt_adapters_are_422_naming_the_problem_and_harm_nothing(app, refs):
    for kind in CORRUPT:
        app.bucket.upload_adapter(f"bad-{kind}", *corrupt_files(app.cfg, kind))
    before = len(app.proxy.log())
    with ThreadPoolExecutor(8) as pool:  # each bad request beside a good one
        bad = {k: pool.submit(app.complete, f"bad-{k}") for k in CORRUPT}
        good = [pool.submit(app.text, WARM[i % 2]) for i in range(len(CORRUPT))]
        for kind, fut in bad.items():
            err = assert_openai_error(fut.result(), 422, "adapter_invalid")
            assert f"bad-{kind}" in err["message"] and CORRUPT[kind] in err["message"], (kind, err)
        assert [f.result() for f in good] == [refs[WARM[i % 2]] for i in range(len(CORRUPT))]
    # Nothing of them is kept: not in the store's cache, not resident, and a second request reads S3 again.
    assert not [k for k in ray_get(app.store.cached.remote()) if k[0].startswith("bad-")]
    assert not [a for a in app.stats()["resident_adapters"] if a.startswith("bad-")]
    for kind in CORRUPT:
        seen = app.proxy.gets(app.key(f"bad-{kind}"), since=before)
        assert_openai_error(app.complete(f"bad-{kind}"), 422, "adapter_invalid")
        assert app.proxy.gets(app.key(f"bad-{kind}"), since=before) > seen, kind  # its manifest was read again
    assert not [k for k in ray_get(app.store.cached.remote()) if k[0].startswith("bad-")]
    assert_serving(app, refs)


def ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref, timeout=60)


# ---- 1. S3 unreachable or throttling: 503 for a cold adapter, the rest keeps serving ---------------

def test_s3_down_cold_adapter_is_503_while_cached_ones_and_the_base_keep_serving(app, refs):
    app.push("cold-down", seed=310)
    app.proxy.down()
    try:
        r = app.complete("cold-down")
        err = assert_openai_error(r, 503, "adapter_unavailable")
        assert "unreachable" in err["message"] and r.headers["retry-after"] == "5"
        assert_serving(app, refs)
        assert app.http.get("/health").json() == {"status": "ok"}
        assert_openai_error(app.http.get("/v1/models"), 503, "adapter_unavailable")  # it lists S3
    finally:
        app.proxy.up()
    assert app.stats()["dead"] is None
    completion_text(app.complete("cold-down"))  # S3 is back: the same adapter loads


def test_s3_throttling_is_retried_a_bounded_number_of_times_then_503(app, refs):
    app.push("cold-throttled", seed=311)
    manifest = app.key("cold-throttled")
    fault = app.proxy.fault(lambda method, key: key == manifest, "slowdown", hold=True)
    try:
        with ThreadPoolExecutor(1) as pool:
            cold = pool.submit(app.complete, "cold-throttled")
            wait_until(lambda: fault.hits == 1, 60, "the cold adapter's first S3 request")
            # While its load is stuck, everything else is served and health checks never touch S3.
            before = len(app.proxy.log())
            assert_serving(app, refs)
            for _ in range(3):
                assert app.http.get("/health").json() == {"status": "ok"}
            assert app.proxy.log()[before:] == []
            fault.release.set()
            r = cold.result(timeout=120)
        err = assert_openai_error(r, 503, "adapter_unavailable")
        assert "SlowDown" in err["message"] and r.headers["retry-after"] == "5"
        assert app.proxy.gets(manifest) == fault.hits == S3_ATTEMPTS
    finally:
        app.proxy.clear()
    completion_text(app.complete("cold-throttled"))
    assert app.proxy.gets(manifest) == S3_ATTEMPTS + 1


# ---- 6. concurrent cold requests: one download; one error for all ---------------------------------

def _queue_behind(app: App, fault: Any, model: str, n: int, pool: ThreadPoolExecutor, hits: int) -> list:
    """`n` requests for `model`, all waiting in the engine on the load that `fault` holds."""
    futures = [pool.submit(app.complete, model) for _ in range(n)]
    wait_until(lambda: app.stats()["waiting"] == n and fault.hits == hits, 60, f"{n} requests queued on one load")
    return futures


@pytest.mark.parametrize("outcome", ["ok", "fails"])
def test_concurrent_cold_requests_share_one_download(app, outcome):
    name = f"flight-{outcome}"
    app.push(name, seed=320 if outcome == "ok" else 321)
    shard_keys = {app.key(name, f) for f in SHARD_FILES}
    fault = app.proxy.fault(lambda method, key: key in shard_keys, "forward" if outcome == "ok" else "slowdown",
                            hold=True)
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = _queue_behind(app, fault, name, 8, pool, hits=TP)  # one GET per rank's shard, held
            fault.release.set()
            responses = [f.result(timeout=120) for f in futures]
    finally:
        app.proxy.clear()
    assert app.proxy.gets(app.key(name)) == 1
    if outcome == "ok":
        assert len({completion_text(r) for r in responses}) == 1
        assert [app.proxy.gets(k) for k in sorted(shard_keys)] == [1] * TP
    else:
        errors = [assert_openai_error(r, 503, "adapter_unavailable")["message"] for r in responses]
        assert len(set(errors)) == 1 and "SlowDown" in errors[0], errors
        assert all(r.headers["retry-after"] == "5" for r in responses)
        assert [app.proxy.gets(k) for k in sorted(shard_keys)] == [S3_ATTEMPTS] * TP  # one load's retries
        completion_text(app.complete(name))  # nothing of the failure was kept


# ---- 4. overload ----------------------------------------------------------------------------------

def test_overload_past_the_queue_bound_is_503_at_once_and_recovers(app, refs):
    app.push("queue-held", seed=330)
    fault = app.proxy.fault(lambda method, key: key == app.key("queue-held"), "forward", hold=True)
    rejected = app.stats()["counters"].get("rejected_overload", 0)
    try:
        with ThreadPoolExecutor(MAX_QUEUE_LEN + 8) as pool:
            queued = _queue_behind(app, fault, "queue-held", MAX_QUEUE_LEN, pool, hits=1)
            # The queue is full and cannot drain (its adapter's load is held): these are refused now.
            over = [pool.submit(app.complete, m) for m in (BASE, *WARM) * 3]
            for f in over:
                r = f.result(timeout=120)
                assert_openai_error(r, 503, "overloaded")
                assert r.headers["retry-after"] == "1"
            assert not any(f.done() for f in queued)
            fault.release.set()
            texts = {completion_text(f.result(timeout=120)) for f in queued}
    finally:
        app.proxy.clear()
    assert len(texts) == 1
    s = app.stats()
    assert s["counters"]["rejected_overload"] - rejected == 9 and s["waiting"] == 0
    assert_serving(app, refs)


# ---- 7. soak --------------------------------------------------------------------------------------

def test_soak_500_requests_at_concurrency_32_over_50_adapters_nothing_lost(app):
    rng = random.Random(0)
    plan = [(SOAK[i % len(SOAK)] if i % 10 else BASE, i % 7 == 0) for i in range(500)]  # (model, stream)
    rng.shuffle(plan)
    prompt = {m: f"soak prompt {i}" for i, m in enumerate((BASE, *SOAK))}
    baseline = drained_pool(app.pool_usage)

    def run(model: str, stream: bool) -> tuple[int, str]:
        body = {"model": model, "prompt": prompt[model], "max_tokens": N, "temperature": 0, "ignore_eos": True}
        if not stream:
            r = app.http.post("/v1/completions", json=body)
            return r.status_code, completion_text(r) if r.status_code == 200 else r.text
        events = stream_events(app.http, body)
        assert events[-1] == "[DONE]", events
        if "error" in events[-2]:
            return events[-2]["error"].get("code"), json.dumps(events[-2])
        return 200, "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: run(*p), plan))
    assert len(results) == 500
    failed = [(m, r) for (m, _), r in zip(plan, results) if r[0] != 200]
    assert failed == [], failed[:5]
    # Outputs equal the same request sent alone (greedy, so batching must not change them).
    alone = {m: app.text(m, prompt[m]) for m in prompt}
    wrong = [(m, s, text) for (m, s), (_, text) in zip(plan, results) if text != alone[m]]
    assert wrong == [], wrong[:5]
    assert len(set(alone.values())) > len(alone) // 2  # the adapters really differ
    usage = drained_pool(app.pool_usage)
    assert usage[0] == usage[1]  # the ranks agree page for page
    for u, b in zip(usage, baseline):
        assert u["kv_pages"] == b["kv_pages"] == 0 and u["sequences"] == 0
        assert u["pinned_adapters"] == 0 and u["pinned_adapter_pages"] == 0


# ---- invariant over the whole module --------------------------------------------------------------

def test_s3_only_ever_saw_reads_of_adapter_files(app):
    """Whatever the requests above sent, the server only read manifests and shard files of valid names."""
    seen = app.proxy.log()
    assert seen
    bad = [s for s in seen if s.method != "GET" or not (KEY.fullmatch(s.key) or (s.key == "" and "list-type" in s.query))]
    assert bad == [], bad[:5]


# ---- 5. a TP worker dies mid-request (last: the group is rebuilt) ---------------------------------

@pytest.mark.parametrize("rank", [1, 0])
def test_worker_killed_mid_request_fails_in_flight_then_group_rebuilds(app, refs, rank):
    long = {"model": WARM[0], "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN - 8, "temperature": 0,
            "ignore_eos": True}
    pids = [w["pid"] for w in app.stats()["workers"]]
    streaming = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        stream = pool.submit(stream_events, app.http, long, lambda n: n >= 3 and streaming.set())
        plain = [pool.submit(app.http.post, "/v1/completions", json={**long, "model": m}) for m in (BASE, *WARM)]
        assert streaming.wait(120), "the stream never started"
        os.kill(pids[rank], signal.SIGKILL)
        try:
            events, cut = stream.result(timeout=120), None  # bounded: ends, never hangs
        except httpx.HTTPError as e:
            events, cut = [], e
        responses = [f.result(timeout=120) for f in plain]
    if rank > 0:  # a TP worker actor: the group's replica answers every request in flight with a typed 503
        assert cut is None and events[-1] == "[DONE]", events[-2:]
        assert events[-2]["error"]["code"] == "replica_group_failed", events[-2:]
        assert not [e for e in events[:-2] if e["choices"][0]["finish_reason"] is not None]  # cut short
        for r in responses:
            assert_openai_error(r, 503, "replica_group_failed")
            assert r.headers["retry-after"] == "5"
    else:
        # Rank 0 runs in the group's replica, which in a one-group app serves the API too (deploy/app.py):
        # its connections go with it. The stream stops without a finish, and Serve's proxy answers each
        # plain request in flight with an error of its own; none hangs. (Behind an Ingress, with several
        # groups or BDLORA_INGRESS=separate, they get the typed 503 above: tests/test_api.py.)
        assert cut is not None or any(isinstance(e, dict) and "error" in e for e in events), events[-2:]
        assert not [e for e in events if isinstance(e, dict) and e.get("choices")
                    and e["choices"][0]["finish_reason"] is not None]
        assert all(r.status_code >= 500 for r in responses), [(r.status_code, r.text[:200]) for r in responses]

    def served_again() -> str | None:
        r = app.complete(WARM[0])
        if r.status_code == 503 and r.json()["error"]["code"] in ("replica_group_failed", "group_unavailable"):
            return None  # being rebuilt
        return completion_text(r)

    assert wait_until(served_again, 300, "the rebuilt group to serve", poll_s=1.0) == refs[WARM[0]]
    assert_serving(app, refs)
    assert not set(pids) & {w["pid"] for w in app.stats()["workers"]}  # every worker was replaced
    usage = drained_pool(app.pool_usage)
    assert usage[0] == usage[1] and usage[0]["kv_pages"] == 0 and usage[0]["pinned_adapters"] == 0
    assert app.http.get("/health").json() == {"status": "ok"}
