"""Fuzzing the served application over HTTP with hypothesis (issue 19), and the store actor's life.

ONE application (module fixture) serves the tiny Llama at TP=2 exactly as `serve run deploy:app`
does, its adapters in the test S3 server. Generated request bodies (valid ones with hostile fields
mixed in, and raw bytes) and generated store objects (mutated manifests and safetensors headers,
uploaded as adapters and then requested) must never get a 5xx, always get OpenAI's error body
with no exception text in it, leave the servers' memory bounded and the reference outputs
unchanged. Each hypothesis example sends a batch of bodies at once, so a CI run covers hundreds of
bodies in seconds. Runs are derandomized: CI sees the same inputs every time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bdlora_ray.config import LlamaConfig
from bdlora_ray.group import STORE_NAMESPACE, StoreShardSource, store_actor_name
from bdlora_ray.lora.shard import shard_adapter
from bdlora_ray.store import AdapterBucket
from bdlora_ray.store.manifest import MANIFEST, build_adapter_files, sha256_hex
from bdlora_ray.synthetic import random_adapter
from bdlora_ray.spec import EngineConfig, GroupConfig
from bdlora_ray.store.s3 import S3Config
from deploy.config import CREDENTIAL_VARS, ApiConfig, AppConfig, without_credentials
from serving_fixtures import assert_openai_error, drained_pool, serve_app, wait_until
from test_reliability_hostile import EXCEPTION_TEXT

pytestmark = pytest.mark.slow

BASE = "tiny-llama"
APP_NAME = "bdlora-fuzz"
TOKEN = "fuzz-admin-token"
TP = 2
PREFIX = "adapters"
WARM = ("fz-warm-a", "fz-warm-b")
MAX_MODEL_LEN = 48      # bounds what a valid generated request can cost
BODIES_PER_EXAMPLE = 10
OBJECTS_PER_EXAMPLE = 5
MIN_BODIES, MIN_OBJECTS = 500, 100
RSS_GROWTH_LIMIT = 256 << 20  # bytes, per server process, over a fuzz run
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class App:
    url: str
    http: httpx.Client
    bucket: AdapterBucket
    cfg: LlamaConfig
    groups: Any
    spec: GroupConfig

    def complete(self, model: str, n: int = 4) -> httpx.Response:
        return self.http.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": n,
                                                       "temperature": 0, "ignore_eos": True})

    def text(self, model: str) -> str:
        r = self.complete(model)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def pool_usage(self) -> list[dict]:
        return self.groups.pool_usage.remote().result(timeout_s=60)


def push(bucket: AdapterBucket, cfg: LlamaConfig, name: str, seed: int) -> None:
    s = shard_adapter(random_adapter(cfg, 8, seed=seed), cfg, TP, "replicated")
    bucket.upload_adapter(name, *build_adapter_files(s, cfg))


@pytest.fixture(scope="module")
def app(ray_session, s3_server, tmp_path_factory) -> Iterator[App]:
    from ray import serve

    from deploy.seed import write_checkpoint

    model = write_checkpoint(tmp_path_factory.mktemp("fuzz") / BASE)
    cfg = LlamaConfig.from_json(model)
    uri = f"s3://{s3_server.create_bucket('fuzz-adapters')}/{PREFIX}"
    bucket = AdapterBucket(uri)
    for i, name in enumerate(WARM):
        push(bucket, cfg, name, seed=700 + i)
    spec = GroupConfig(model_path=str(model), adapters_uri=uri, tp=TP, worker_cpus=0.2,
                       engine=EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=16, max_queue_len=256),
                       s3=S3Config(max_attempts=2), env_vars=without_credentials(s3_server.env))
    config = AppConfig(group=spec, api=ApiConfig(model_name=BASE, admin_token=TOKEN))
    with serve_app(config, app_name=APP_NAME) as url, httpx.Client(base_url=url, timeout=120) as http:
        a = App(url, http, bucket, cfg, serve.get_deployment_handle("EngineGroup", APP_NAME), spec)
        for name in WARM:
            a.text(name)
        yield a


@pytest.fixture(scope="module")
def refs(app: App) -> dict[str, str]:
    return {m: app.text(m) for m in (BASE, *WARM)}


# ---- what the servers are: Ray's actor table ----------------------------------------------------------

def actor_records() -> list[Any]:
    """Every actor as the GCS holds it (runtime_env, pid, restarts). Ray's state API needs the
    dashboard, which the test cluster does not run; this reads the same table."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    return [gcs_pb2.ActorTableData.FromString(raw) for raw in state._connect_and_get_accessor().get_actor_table(None, None)]


def server_rss() -> dict[int, int]:
    """pid -> resident bytes of every live actor process (Serve's controller, proxy, replicas, the
    TP workers, the adapter store)."""
    import psutil

    out = {}
    for a in actor_records():
        if a.state == a.ALIVE and a.pid:
            try:
                out[a.pid] = psutil.Process(a.pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return out


def store_record(app: App) -> Any:
    name = store_actor_name(app.spec)
    (rec,) = [a for a in actor_records() if a.name == name and a.ray_namespace == STORE_NAMESPACE
              and a.state == a.ALIVE]
    return rec


# ---- the adapter-store actor: credentials, configuration, restarts ------------------------------------

def test_no_actor_keeps_credentials_in_its_runtime_env_and_the_store_still_reads_s3(app, refs):
    """Ray keeps each actor's runtime_env in its control store: no S3 credentials there. The store
    reads them from its process environment (on this local cluster, inherited from the driver)."""
    envs = {a.class_name: a.serialized_runtime_env for a in actor_records() if a.state == a.ALIVE}
    assert "AWS_ENDPOINT_URL" in store_record(app).serialized_runtime_env  # the field is what we read
    leaked = {cls: sorted(k for k in CREDENTIAL_VARS if k in env) for cls, env in envs.items()}
    assert not any(leaked.values()), leaked
    push(app.bucket, app.cfg, "fz-credentials", seed=710)
    assert app.complete("fz-credentials").status_code == 200  # a cold load: the store read S3


def test_a_store_with_other_settings_is_never_reused(app):
    """Groups find the detached store by name: the name covers every StoreConfig setting, so a group
    configured otherwise (cache size, S3 retries, max rank) gets a store of its own."""
    base = app.spec
    assert store_record(app).name == store_actor_name(base)  # the running store is found under it
    assert store_actor_name(dataclasses.replace(base, worker_cpus=1.0)) == store_actor_name(base)  # not a store setting
    changed = [dataclasses.replace(base, store_cache_bytes=1 << 20),
               dataclasses.replace(base, s3=dataclasses.replace(base.s3, max_attempts=9)),
               dataclasses.replace(base, engine=dataclasses.replace(base.engine, max_lora_rank=8))]
    assert len({store_actor_name(c) for c in changed} | {store_actor_name(base)}) == 4


def test_a_dead_store_is_a_typed_503_then_it_restarts_and_serves(app, refs):
    import ray

    rec = store_record(app)
    store = ray.get_actor(rec.name, namespace=STORE_NAMESPACE)
    # A handle's call on a dead actor: the worker side's view is a typed 503, not an untyped error.
    dead = ray.remote(num_cpus=0)(_Dead).remote()
    ray.kill(dead, no_restart=True)
    with pytest.raises(Exception) as e:
        StoreShardSource(dead).get_shard(WARM[0], 0)
    assert type(e.value).__name__ == "AdapterUnavailable" and e.value.http_status == 503

    push(app.bucket, app.cfg, "fz-after-restart", seed=711)
    ray.kill(store, no_restart=False)  # as if its process died

    def served() -> str | None:
        r = app.complete("fz-after-restart")
        if r.status_code == 503:
            assert_openai_error(r, 503, "adapter_unavailable")  # restarting: typed, retryable
            return None
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    wait_until(served, 120, "the restarted store to serve a cold adapter", poll_s=0.5)
    assert store_record(app).num_restarts == rec.num_restarts + 1
    assert app.http.get("/v1/models").status_code == 200
    for m, want in refs.items():
        assert app.text(m) == want


class _Dead:
    def get_shard(self, name: str, rank: int) -> None:
        raise AssertionError("never called")


# ---- request bodies --------------------------------------------------------------------------------------

SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udbff\udbff", "a\ud83d"])
TEXT = st.one_of(st.text(max_size=24), st.sampled_from(["", " ", "\x00", "\u2028\u2029\x85", "😀" * 4, "\ufffd"]),
                 st.builds(lambda a, s, b: a + s + b, st.text(max_size=6), SURROGATES, st.text(max_size=6)))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                   st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON_ANY = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(TEXT, inner, max_size=4)), max_leaves=8)
NAMES = st.one_of(st.sampled_from([BASE, *WARM, "never-pushed", "../x", "a/b", "..", "x" * 200, "名前", "a b",
                                   "adapters/fz-warm-a", "fz-warm-a\n", "-x"]), TEXT)
BAD_COUNT = st.one_of(st.integers(-(2 ** 70), 0), st.integers(MAX_MODEL_LEN, 2 ** 70), st.floats(), TEXT, JSON_ANY)
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), TEXT),
                                 "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=3),
                                     JSON_ANY)})
HOSTILE = {  # field -> values, mostly invalid; valid ones are kept cheap (few tokens)
    "model": NAMES,
    "prompt": st.one_of(TEXT, st.lists(st.integers(-(2 ** 40), 2 ** 40), max_size=8), st.lists(TEXT, max_size=3),
                        st.lists(st.lists(st.integers(0, 300), max_size=4), max_size=3), JSON_ANY),
    "messages": st.one_of(st.lists(MESSAGE, max_size=3), JSON_ANY),
    "max_tokens": BAD_COUNT, "max_completion_tokens": BAD_COUNT,
    "temperature": st.one_of(st.floats(), TEXT, JSON_ANY), "top_p": st.one_of(st.floats(), JSON_ANY),
    "top_k": st.one_of(st.integers(-(2 ** 70), 2 ** 70), JSON_ANY), "n": st.one_of(st.integers(), JSON_ANY),
    "seed": st.one_of(st.integers(-(2 ** 80), 2 ** 80), JSON_ANY),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=40), JSON_ANY),
    "stream": st.one_of(st.booleans(), JSON_ANY), "stream_options": JSON_ANY, "ignore_eos": JSON_ANY,
    "logit_bias": JSON_ANY, "logprobs": JSON_ANY, "presence_penalty": JSON_ANY, "echo": JSON_ANY,
    "best_of": JSON_ANY, "suffix": JSON_ANY, "tools": JSON_ANY, "response_format": JSON_ANY, "user": JSON_ANY,
    "an-unknown-field": JSON_ANY,
}


@st.composite
def request_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """(path, body bytes): a valid cheap request with up to three fields made hostile, or raw bytes."""
    kind = draw(st.sampled_from(["completions", "chat", "chat", "completions", "raw", "admin"]))
    if kind == "raw":
        path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
        return path, draw(st.one_of(st.binary(max_size=64),
                                    st.builds(lambda s, k: s[:k], st.just(b'{"model": "tiny-llama", "prompt": "hi"}'),
                                              st.integers(0, 38))))
    if kind == "admin":
        return "/v1/adapters", json.dumps({"name": draw(NAMES)}).encode()
    body: dict[str, Any] = {"model": draw(st.sampled_from([BASE, *WARM])), "max_tokens": draw(st.integers(1, 3)),
                            "temperature": 0}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": draw(st.text(min_size=1, max_size=12))}]
    else:
        body["prompt"] = draw(st.text(min_size=1, max_size=12))
    for field in draw(st.lists(st.sampled_from(sorted(HOSTILE)), max_size=3, unique=True)):
        body[field] = draw(HOSTILE[field])
    if draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(["model", "prompt", "messages"])), None)
    # ensure_ascii: lone surrogates travel as \ud800 escapes; NaN/Infinity as Python writes them.
    return f"/v1/{'chat/' if kind == 'chat' else ''}completions", json.dumps(body).encode()


def check_response(r: httpx.Response) -> None:
    """No 5xx for a client's fault; OpenAI's error body; no exception text in any error."""
    assert r.status_code < 500, (r.request.content[:200], r.status_code, r.text[:500])
    if r.status_code != 200:
        err = assert_openai_error(r, r.status_code)
        assert not EXCEPTION_TEXT.search(err["message"]), err
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text[-300:]
        for e in map(json.loads, events[:-1]):
            if "error" in e:
                assert e["error"]["type"] != "server_error" and not EXCEPTION_TEXT.search(e["error"]["message"]), e
            else:
                assert e["object"] in ("text_completion", "chat.completion.chunk"), e
    else:
        body = r.json()
        assert body.get("object") in ("text_completion", "chat.completion", "adapter"), body


def post_all(app: App, requests: list[tuple[str, bytes]]) -> list[httpx.Response]:
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda pr: app.http.post(pr[0], content=pr[1], headers=headers), requests))


def test_fuzzed_request_bodies_never_harm_the_server(app, refs):
    sent = 0

    @settings(FUZZ, max_examples=MIN_BODIES // BODIES_PER_EXAMPLE)
    @given(st.lists(request_bodies(), min_size=BODIES_PER_EXAMPLE, max_size=BODIES_PER_EXAMPLE))
    def fuzz(requests: list[tuple[str, bytes]]) -> None:
        nonlocal sent
        for r in post_all(app, requests):
            check_response(r)
        sent += len(requests)

    post_all(app, [("/v1/completions", b'{"model": "tiny-llama", "prompt": "\\ud800"}')] * 4)  # warm the paths
    before = server_rss()
    fuzz()
    after = server_rss()
    assert sent >= MIN_BODIES, sent
    grown = {pid: after[pid] - rss for pid, rss in before.items() if pid in after}
    assert grown and max(grown.values()) < RSS_GROWTH_LIMIT, grown
    for m, want in refs.items():  # outputs unchanged after the run
        assert app.text(m) == want, m
    usage = drained_pool(app.pool_usage)
    assert usage[0] == usage[1] and usage[0]["kv_pages"] == 0  # nothing leaked, and the ranks agree


# ---- store objects ---------------------------------------------------------------------------------------

DEEP = b"[" * 50_000 + b"]" * 50_000  # spliced into the JSON text: json.dumps itself could not nest so deep


def _paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON document (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, prefix + (i,))
    return out


def _set(d: Any, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[path[-1]]
    else:
        d[path[-1]] = value


_DELETE = object()
_MARK = "@@deep@@"
OBJECT_VALUES = st.one_of(JSON_ANY, st.just(_DELETE), st.just(_MARK), st.integers(-(2 ** 66), 2 ** 66),
                          st.sampled_from([0, -1, 1, 2, 3, 8, 2 ** 31, "F32", "BF16", "I64", "bd", "slora", [], {}]))


@st.composite
def store_objects(draw: st.DrawFn, good: tuple[dict, dict, list[bytes]]) -> tuple[bytes, list[bytes], str]:
    """(manifest bytes, shard files, what was mutated): a good adapter with its manifest or one
    shard's safetensors header mutated (the manifest re-sealed, so the header is what gets checked)."""
    manifest, header, blobs = copy.deepcopy(good[0]), copy.deepcopy(good[1]), list(good[2])
    target = draw(st.sampled_from(["manifest", "manifest", "header", "header", "header-bytes", "manifest-bytes"]))
    if target == "manifest-bytes":
        return draw(st.one_of(st.binary(max_size=80), st.just(DEEP))), blobs, target
    doc = manifest if target == "manifest" else header
    if target == "header-bytes":
        data = blobs[0]
        n = draw(st.sampled_from([0, 1, 7, 8, 2 ** 63, 2 ** 64 - 1, len(data), struct.unpack("<Q", data[:8])[0] + 1]))
        blobs[0] = struct.pack("<Q", n % 2 ** 64) + data[8:draw(st.integers(8, len(data)))]
    else:
        for _ in range(draw(st.integers(1, 3))):
            paths = _paths(doc)
            if not paths:
                break
            _set(doc, draw(st.sampled_from(paths)), draw(OBJECT_VALUES))
        if target == "header":
            text = json.dumps(doc).encode().replace(f'"{_MARK}"'.encode(), DEEP)
            blobs[0] = struct.pack("<Q", len(text)) + text + blobs[0][8 + struct.unpack("<Q", blobs[0][:8])[0]:]
    if target != "manifest":  # re-seal: the size and sha256 match, so the header is what gets checked
        manifest["files"][0].update(size=len(blobs[0]), sha256=sha256_hex(blobs[0]))
    data = json.dumps(manifest).encode().replace(f'"{_MARK}"'.encode(), DEEP)
    return data, blobs, target


def test_fuzzed_store_objects_are_422_and_never_harm_the_listing_or_the_server(app, refs):
    import ray

    s = shard_adapter(random_adapter(app.cfg, 8, seed=720), app.cfg, TP, "replicated")
    m, blobs = build_adapter_files(s, app.cfg)
    header = json.loads(blobs[0][8:8 + struct.unpack("<Q", blobs[0][:8])[0]])
    uploaded: list[str] = []
    outcomes: dict[int, int] = {}

    @settings(FUZZ, max_examples=MIN_OBJECTS // OBJECTS_PER_EXAMPLE)
    @given(st.lists(store_objects((m.to_dict(), header, blobs)), min_size=OBJECTS_PER_EXAMPLE,
                    max_size=OBJECTS_PER_EXAMPLE))
    def fuzz(objects: list[tuple[bytes, list[bytes], str]]) -> None:
        names = []
        for data, files, _ in objects:
            name = f"fz-obj-{len(uploaded)}"
            for i, f in enumerate(files):
                app.bucket.put(name, f"rank-{i}-of-{TP}.safetensors", f)
            app.bucket.put(name, MANIFEST, data)
            uploaded.append(name)
            names.append(name)
        with ThreadPoolExecutor(len(names)) as pool:
            responses = list(pool.map(lambda n: app.complete(n, 2), names))
        for (data, _, what), r in zip(objects, responses):
            check_response(r)
            assert r.status_code in (200, 422), (what, data[:300], r.text)
            if r.status_code == 422:
                assert_openai_error(r, 422, "adapter_invalid")
            outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
        if len(uploaded) % 25 < OBJECTS_PER_EXAMPLE:
            assert app.http.get("/v1/models").status_code == 200

    before = server_rss()
    fuzz()
    after = server_rss()
    assert len(uploaded) >= MIN_OBJECTS and outcomes.get(422, 0) >= MIN_OBJECTS // 2, outcomes
    grown = {pid: after[pid] - rss for pid, rss in before.items() if pid in after}
    assert grown and max(grown.values()) < RSS_GROWTH_LIMIT, grown
    r = app.http.get("/v1/models")  # every broken object is under the prefix: the listing still works
    assert r.status_code == 200
    listed = {c["id"] for c in r.json()["data"]}
    assert set(WARM) <= listed
    metrics = app.http.get("/metrics").text
    unservable = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("bdlora_unservable_adapters ")]
    broken = {n for n in uploaded if n not in listed}
    assert broken and unservable == [len(broken)], (unservable, len(broken))
    store = ray.get_actor(store_record(app).name, namespace=STORE_NAMESPACE)
    assert not [k for k in ray.get(store.cached.remote(), timeout=60) if k[0] in broken]  # nothing of them kept
    for mdl, want in refs.items():
        assert app.text(mdl) == want, mdl
