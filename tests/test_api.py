"""The Serve deployment (deploy/): OpenAI protocol, validation, error mapping, SSE, admin token,
metrics and routing.

Most tests drive the FastAPI app in process over fake replica groups with
EngineGroup's interface (fast, no Ray). The `served` tests run the application
as `serve run deploy:app` does, on a local Ray cluster, and drive it over HTTP
with the official `openai` client: once with fake groups (routing, multiplexing,
cancellation across processes) and once with real TP=2 EngineGroups.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from bdlora_ray.errors import AdapterInvalid, AdapterNotFound, AdapterUnavailable, Overloaded
from bdlora_ray.request import GenerationRequest, RequestOutput
from bdlora_ray.store.manifest import check_name
from bdlora_ray.tokenizer import make_byte_tokenizer
from deploy.api import make_api, sse
from bdlora_ray.spec import EngineConfig, GroupConfig
from deploy.config import ApiConfig, AppConfig, ScalingConfig, without_credentials
from deploy.routing import LocalRouter
from deploy.serving import GroupServer
from serving_fixtures import assert_openai_error, serve_app, wait_until

BASE = "tiny-llama"
_FAKE_ADAPTER = re.compile(r"alpha|beta|gamma|slow|crash|aff-\d+")


class FakeGroup:
    """EngineGroup's serving interface over a deterministic "model": the output cycles through
    "<adapter or base>|", one byte-token per event. Adapters: see `_FAKE_ADAPTER`; `broken` is
    invalid, `flaky` unavailable, `slow` never finishes, `crash` fails after one token."""

    def __init__(self, spec: object = None, load_delay_s: float = 0.0, max_model_len: int = 64) -> None:
        self.tokenizer = make_byte_tokenizer()
        self.model_name, self.max_model_len = BASE, max_model_len
        self.load_delay_s = load_delay_s
        self.resident: list[str] = []
        self.loads: Counter[str] = Counter()    # adapter -> times made resident here
        self.served: Counter[str] = Counter()   # adapter (or BASE) -> requests run here
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.healthy, self.overloaded = True, False

    async def load_adapter(self, name: str) -> None:
        check_name(name)
        if name == "broken":
            raise AdapterInvalid(f"adapter {name!r}: sha256 mismatch")
        if name == "flaky":
            raise AdapterUnavailable(f"adapter {name!r}: adapter store unreachable")
        if not _FAKE_ADAPTER.fullmatch(name):
            raise AdapterNotFound(f"adapter {name!r} not found")
        if name not in self.resident:
            if self.load_delay_s:
                await asyncio.sleep(self.load_delay_s)  # stands for an S3 download
            self.resident.append(name)
            self.loads[name] += 1

    async def generate(self, req: GenerationRequest):
        if self.overloaded:
            raise Overloaded("the queue is full")
        req.params.validate()
        if req.adapter is not None:
            await self.load_adapter(req.adapter)
        self.requests.append(req)
        self.served[req.adapter or BASE] += 1
        pattern = self.tokenizer.encode(f"{req.adapter or BASE}|")
        n = req.params.max_tokens
        for i in range(n):
            await asyncio.sleep(0)
            if req.adapter == "slow" and i == 1:
                await asyncio.Event().wait()  # never set: only a cancellation ends this request
            if req.adapter == "crash" and i == 1:
                yield RequestOutput(req.request_id, (), "", True, "error", len(req.prompt_ids), i,
                                    error="a TP worker failed", error_status=500)
                return
            t, last = pattern[i % len(pattern)], i == n - 1
            yield RequestOutput(req.request_id, (t,), self.tokenizer.decode([t]), last, "length" if last else None,
                                len(req.prompt_ids), i + 1)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def unload_adapter(self, name: str) -> None:
        check_name(name)
        if name in self.resident:
            self.resident.remove(name)

    def resident_adapters(self) -> list[str]:
        return sorted(self.resident)

    async def list_adapters(self) -> list[dict]:
        return [{"name": "alpha", "rank": 8, "mode": "bd", "tp": 2}, {"name": "beta", "rank": 16, "mode": "slora", "tp": 2},
                {"name": "broken", "rank": 0, "mode": "", "tp": 0, "error": "AdapterInvalid: sha256 mismatch"}]

    async def stats(self) -> dict:  # the keys EngineGroup.stats() has
        return {"waiting": 2, "running": 3, "resident_adapters": sorted(self.resident),
                "requests_per_adapter": {("" if k == BASE else k): v for k, v in self.served.items()},
                "counters": {"adapter_fetches": sum(self.loads.values()), "finished_abort": len(self.aborted)},
                "pool": {"total_pages": 100, "free_pages": 80, "kv_pages": 12, "adapter_pages": 8,
                         "pinned_adapter_pages": 4, "adapters": len(self.resident),
                         "loads": sum(self.loads.values()), "evictions": 1}}

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("a TP worker died")

    def shutdown(self) -> None:
        pass


def fake_text(model: str, n: int) -> str:
    return (f"{model}|" * n)[:n]


def make_client(*groups: FakeGroup, **api: object) -> tuple[TestClient, list[FakeGroup]]:
    gs = list(groups) or [FakeGroup()]
    app = make_api(LocalRouter([GroupServer(g) for g in gs]), ApiConfig(model_name=BASE, **api))
    return TestClient(app, raise_server_exceptions=False), gs


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of a server-sent-event body, checking the framing on the way."""
    blocks = text.split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    assert all(b.startswith("data: ") for b in blocks[:-1]), blocks
    return [b[len("data: "):] for b in blocks[:-1]]


# ---- completions and chat -------------------------------------------------------------------------

def test_completion_output_usage_and_adapter_choice():
    c, (g,) = make_client()
    for model in (BASE, "alpha"):
        r = c.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 7})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == model
        assert body["choices"] == [{"index": 0, "text": fake_text(model, 7), "logprobs": None,
                                    "finish_reason": "length"}]
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert [r.adapter for r in g.requests] == [None, "alpha"]
    assert g.requests[0].prompt_ids == tuple(g.tokenizer.encode("hello"))


def test_completion_defaults_and_prompt_forms():
    c, (g,) = make_client()
    assert c.post("/v1/completions", json={"model": BASE, "prompt": [10, 11, 12]}).status_code == 200
    assert c.post("/v1/completions", json={"model": BASE, "prompt": ["hi"], "temperature": 0,
                                           "top_p": 0.5, "top_k": 4, "seed": 7, "stop": "x"}).status_code == 200
    first, second = g.requests
    assert first.prompt_ids == (10, 11, 12) and first.params.max_tokens == 16  # OpenAI's default
    assert second.prompt_ids == tuple(g.tokenizer.encode("hi"))
    p = second.params
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (0.0, 0.5, 4, 7, ("x",))


def test_chat_renders_the_template_and_fills_max_tokens_from_the_context():
    c, (g,) = make_client()
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    r = c.post("/v1/chat/completions", json={"model": "beta", "messages": messages})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (req,) = g.requests
    text = "<|system|>be brief\n<|user|>hi there\n<|assistant|>"
    assert req.prompt_ids == tuple(g.tokenizer.encode(text, add_special_tokens=False))
    assert req.params.max_tokens == g.max_model_len - len(req.prompt_ids)  # OpenAI: the rest of the context
    assert body["choices"][0]["message"] == {"role": "assistant", "content": fake_text("beta", req.params.max_tokens)}
    assert body["usage"]["completion_tokens"] == req.params.max_tokens
    r = c.post("/v1/chat/completions", json={"model": "beta", "messages": messages, "max_completion_tokens": 3})
    assert r.json()["choices"][0]["message"]["content"] == "bet"


def test_streamed_completion_is_sse_and_matches_the_plain_one():
    c, _ = make_client()
    body = {"model": "alpha", "prompt": "abc", "max_tokens": 9}
    plain = c.post("/v1/completions", json=body).json()
    r = c.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {ch["id"] for ch in chunks} == {chunks[0]["id"]} and all(ch["object"] == "text_completion" for ch in chunks)
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(ch["choices"][0]["text"] for ch in text_chunks) == plain["choices"][0]["text"]
    # Tokens that arrive while a chunk is being sent share the next chunk: how many chunks varies.
    reasons = [ch["choices"][0]["finish_reason"] for ch in text_chunks]
    assert reasons == [None] * (len(reasons) - 1) + ["length"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
    assert all("usage" not in ch for ch in text_chunks)


def test_streamed_chat_opens_with_the_role_and_ends_with_a_finish_chunk():
    c, _ = make_client()
    r = c.post("/v1/chat/completions", json={"model": BASE, "max_tokens": 4, "stream": True,
                                             "messages": [{"role": "user", "content": "hi"}]})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == fake_text(BASE, 4)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model,status,code,retry_after", [
    ("nope", 404, "model_not_found", None),
    ("broken", 422, "adapter_invalid", None),
    ("flaky", 503, "adapter_unavailable", "5"),
])
def test_adapter_errors_map_to_status_and_leave_other_requests_alone(model, status, code, retry_after, stream):
    c, (g,) = make_client()
    r = c.post("/v1/completions", json={"model": model, "prompt": "x", "stream": stream})
    assert_openai_error(r, status, code)  # JSON even for stream=true: the first event is awaited
    assert r.headers.get("retry-after") == retry_after
    ok = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "alp"
    assert [q.adapter for q in g.requests] == ["alpha"]


def test_overload_is_503_with_retry_after():
    c, (g,) = make_client()
    g.overloaded = True
    r = c.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": "x"}]})
    assert_openai_error(r, 503, "overloaded")
    assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize("name", ["../etc", "a b", "-lead", "a..b", "x" * 129, "ünï", ".hidden"])
def test_invalid_adapter_names_are_refused_before_reaching_a_group(name):
    c, (g,) = make_client()
    for r in (c.post("/v1/completions", json={"model": name, "prompt": "x"}),
              c.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "x"}]}),
              c.post("/v1/adapters", json={"name": name})):
        assert_openai_error(r, 400, "invalid_adapter_name")
    if "/" not in name:  # a slash never reaches the route
        assert_openai_error(c.delete(f"/v1/adapters/{name}"), 400, "invalid_adapter_name")
    assert g.requests == [] and g.loads == Counter()


@pytest.mark.parametrize("patch,param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"n": 17}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, None),     # SamplingParams.validate
    ({"min_tokens": 5}, None),              # > max_tokens
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, None),
    ({"echo": True, "logprobs": 1}, None),
    ({"suffix": "s"}, "suffix"),
    ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": ["a"] * 9, "n": 8}, None),  # 72 sequences
    ({"stream": "sometimes"}, "stream"),
    ({"model": None}, "model"),
    ({"stop": ["s"] * 17}, None),           # SamplingParams.validate
    ({"max_tokens": 60}, None),             # prompt + max_tokens > max_model_len (64)
    ({"prompt": ""}, None),
    ({"prompt": [300]}, None),              # outside the tokenizer's ids
])
def test_bad_parameters_are_400_with_the_openai_body(patch, param):
    c, (g,) = make_client()
    body = {"model": "alpha", "prompt": "hello", "max_tokens": 4, **patch}
    err = assert_openai_error(c.post("/v1/completions", json=body), 400)
    assert err["param"] == param
    assert g.requests == []


@pytest.mark.parametrize("raw", [b"{", b"[]", b'{"model": "alpha"}', b"\xff\xfe"])
def test_malformed_bodies_are_400(raw):
    c, (g,) = make_client()
    r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert g.requests == []


def test_chat_with_non_text_content_is_400():
    c, _ = make_client()
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
    assert_openai_error(c.post("/v1/chat/completions", json={"model": BASE, "messages": [msg]}), 400)
    assert_openai_error(c.post("/v1/chat/completions", json={"model": BASE, "messages": []}), 400, param="messages")


def test_engine_error_after_the_start_is_reported_plain_and_in_the_stream():
    c, _ = make_client()
    body = {"model": "crash", "prompt": "x", "max_tokens": 5}
    err = assert_openai_error(c.post("/v1/completions", json=body), 500)
    assert "TP worker failed" in err["message"]
    events = sse_events(c.post("/v1/completions", json={**body, "stream": True}).text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "c"
    assert "TP worker failed" in json.loads(events[1])["error"]["message"]
    assert c.post("/v1/completions", json={**body, "model": "alpha"}).status_code == 200


# ---- raw ASGI: body limits and client disconnects -------------------------------------------------

async def _call_asgi(app, body_chunks: list[bytes], headers: list[tuple[bytes, bytes]], spec: str,
                     disconnect_after_first_event: bool) -> list[dict]:
    """One POST /v1/completions through the ASGI interface, the client leaving when told to."""
    sent: list[dict] = []
    got_event = asyncio.Event()
    incoming = [{"type": "http.request", "body": b, "more_body": i < len(body_chunks) - 1}
                for i, b in enumerate(body_chunks)]

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await got_event.wait() if disconnect_after_first_event else asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict) -> None:
        if got_event.is_set() and spec == "2.4":
            raise OSError("connection reset by peer")  # how an ASGI 2.4 server reports a gone client
        sent.append(msg)
        if msg["type"] == "http.response.body" and msg.get("body"):
            got_event.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), *headers]}
    await asyncio.wait_for(app(scope, receive, send), timeout=20)
    return sent


# ASGI < 2.4: the server reports the disconnect as a message, even while the generation is stalled
# ("slow"). ASGI 2.4: the next write fails, so the generation must still be producing ("alpha").
@pytest.mark.parametrize("spec,model", [("2.3", "slow"), ("2.4", "alpha")])
def test_client_disconnect_mid_stream_aborts_the_request(spec, model):
    g = FakeGroup()
    app = make_api(LocalRouter([GroupServer(g)]), ApiConfig(model_name=BASE))
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 50, "stream": True}).encode()
    sent = asyncio.run(_call_asgi(app, [body], [(b"content-length", str(len(body)).encode())], spec, True))
    assert sent[0]["status"] == 200
    assert len([m for m in sent if m.get("body")]) < 50  # it stopped early
    (req,) = g.requests
    assert g.aborted == [req.request_id]


def test_bodies_over_the_limit_are_413_declared_or_not():
    c, (g,) = make_client(max_body_bytes=1000)
    big = {"model": "alpha", "prompt": "x" * 2000}
    assert_openai_error(c.post("/v1/completions", json=big), 413, "request_too_large")
    g2 = FakeGroup()
    app = make_api(LocalRouter([GroupServer(g2)]), ApiConfig(model_name=BASE, max_body_bytes=1000))
    chunked = asyncio.run(_call_asgi(app, [b'{"model": "alpha", "prompt": "', b"x" * 600, b"x" * 600, b'"}'],
                                     [], "2.3", False))
    assert chunked[0]["status"] == 413
    assert json.loads(chunked[1]["body"])["error"]["code"] == "request_too_large"
    small = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
    assert small.status_code == 200
    assert [r.adapter for r in g.requests] == ["alpha"] and g2.requests == []


# ---- models, admin, health, routes ----------------------------------------------------------------

def test_models_lists_the_base_model_and_servable_adapters():
    c, _ = make_client()
    body = c.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["parent"], m["rank"], m["mode"]) for m in body["data"]] == [
        (BASE, None, None, None), ("alpha", BASE, 8, "bd"), ("beta", BASE, 16, "slora")]
    assert all(m["object"] == "model" for m in body["data"])


@pytest.mark.parametrize("auth,status", [
    (None, 401), ("Bearer wrong-token", 401), ("Basic s3cret-token", 401), ("Bearer s3cret-token-and-more", 401),
    ("Bearer s3cret-token", 200), ("bearer s3cret-token", 200),
])
def test_admin_endpoints_need_the_token_when_one_is_set(auth, status):
    c, (g,) = make_client(admin_token="s3cret-token")
    headers = {"authorization": auth} if auth else {}
    load = c.post("/v1/adapters", json={"name": "alpha"}, headers=headers)
    unload = c.delete("/v1/adapters/alpha", headers=headers)
    if status == 401:
        for r in (load, unload):
            assert_openai_error(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert g.loads == Counter()
    else:
        assert load.json() == {"object": "adapter", "name": "alpha", "status": "loaded"}
        assert unload.json() == {"object": "adapter", "name": "alpha", "status": "unloaded", "groups": 1}
        assert g.loads == Counter(alpha=1) and g.resident == []
    assert c.post("/v1/completions", json={"model": "alpha", "prompt": "x"}).status_code == 200  # not admin


def test_admin_endpoints_are_open_without_a_token_and_map_adapter_errors():
    c, (g,) = make_client()
    assert c.post("/v1/adapters", json={"name": "gamma"}).status_code == 200
    assert g.resident == ["gamma"]
    assert_openai_error(c.post("/v1/adapters", json={"name": "nope"}), 404, "model_not_found")
    assert_openai_error(c.post("/v1/adapters", json={"name": "broken"}), 422, "adapter_invalid")
    assert_openai_error(c.post("/v1/adapters", json={}), 400, param="name")
    assert c.delete("/v1/adapters/gamma").status_code == 200 and g.resident == []


def test_health_reflects_the_groups():
    c, (_, g2) = make_client(FakeGroup(), FakeGroup())
    assert c.get("/health").json() == {"status": "ok"}
    g2.healthy = False
    assert "TP worker died" in assert_openai_error(c.get("/health"), 503, "group_unavailable")["message"]


def test_unknown_routes_and_methods_get_openai_errors():
    c, _ = make_client()
    assert_openai_error(c.get("/v1/nothing"), 404)
    assert_openai_error(c.get("/v1/completions"), 405)


# ---- routing --------------------------------------------------------------------------------------

def test_local_router_prefers_a_holder_of_the_adapter_then_the_least_loaded():
    a, b = FakeGroup(), FakeGroup()
    router = LocalRouter([GroupServer(a), GroupServer(b)])
    b.resident.append("alpha")
    router.inflight = [0, 5]
    assert router.pick("alpha") == 1      # b holds it, though busier
    assert router.pick("beta") == 0       # nobody holds it: the least loaded
    assert router.pick(None) == 0
    router.inflight = [3, 1]
    assert router.pick(None) == 1
    c, _ = make_client(a, b)
    for _ in range(4):
        assert c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert a.served["alpha"] == 0 and b.served["alpha"] == 4 and a.loads["alpha"] == 0


# ---- metrics --------------------------------------------------------------------------------------

def _metrics(c: TestClient) -> dict[tuple[str, tuple], float]:
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_count_requests_tokens_adapters_and_engine_gauges():
    c, _ = make_client(FakeGroup(), FakeGroup(), max_adapter_labels=1)
    for model, n in (("alpha", 3), ("alpha", 2), ("beta", 4), (BASE, 1)):
        assert c.post("/v1/completions", json={"model": model, "prompt": "hey", "max_tokens": n}).status_code == 200
    assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    c.post("/v1/completions", json={"model": "gamma", "prompt": "x", "max_tokens": 1, "stream": True})
    m = _metrics(c)
    assert m[("bdlora_requests_total", (("route", "/v1/completions"), ("status", "200")))] == 5
    assert m[("bdlora_requests_total", (("route", "/v1/completions"), ("status", "404")))] == 1
    assert m[("bdlora_request_latency_seconds_count", (("route", "/v1/completions"),))] == 6
    assert m[("bdlora_tokens_total", (("kind", "prompt"),))] == 4 * 3 + 1
    assert m[("bdlora_tokens_total", (("kind", "completion"),))] == 3 + 2 + 4 + 1 + 1
    # One adapter label allowed: the first adapter served keeps it, the others share "_other".
    assert m[("bdlora_adapter_requests_total", (("adapter", "alpha"),))] == 2
    assert m[("bdlora_adapter_requests_total", (("adapter", "_other"),))] == 2
    assert m[("bdlora_adapter_requests_total", (("adapter", "_base"),))] == 1
    assert not any(k[0] == "bdlora_adapter_requests_total" and ("adapter", "nope") in k[1] for k in m)
    assert m[("bdlora_time_to_first_token_seconds_count", ())] == 5
    # Engine gauges: summed over the two groups' stats.
    assert m[("bdlora_groups", ())] == 2
    assert m[("bdlora_queue_length", ())] == 4 and m[("bdlora_running_requests", ())] == 6
    assert {k[1][0][1]: v for k, v in m.items() if k[0] == "bdlora_pool_pages"} == {
        "free": 160, "kv": 24, "adapter": 16, "pinned_adapter": 8, "total": 200}
    assert m[("bdlora_adapter_loads", ())] == 3 and m[("bdlora_adapter_evictions", ())] == 2


# ---- configuration and the Serve application object -----------------------------------------------

def test_config_from_env():
    env = {"BDLORA_MODEL_PATH": "/models/Llama-3.1-8B", "BDLORA_TP": "8", "BDLORA_USE_GPU": "true",
           "BDLORA_NUM_GROUPS": "3", "BDLORA_ADMIN_TOKEN": "s3cr3t-value", "BDLORA_ENGINE_MAX_NUM_SEQS": "128",
           "BDLORA_ENGINE_DTYPE": "bfloat16", "BDLORA_ADAPTERS_URI": "s3://b/p", "BDLORA_REPLICA_CPUS": "2"}
    c = AppConfig.from_env(env)
    assert c.api.model_name == "Llama-3.1-8B" and c.api.admin_token == "s3cr3t-value" and "s3cr3t" not in repr(c)
    gc = c.group
    assert (gc.tp, gc.use_gpu, gc.engine.max_num_seqs, gc.engine.dtype, gc.adapters_uri) == (8, True, 128, "bfloat16",
                                                                                            "s3://b/p")
    bundles = c.group.bundles()
    # Bundle 0 is the replica, which runs rank 0 (its GPU) beside the scheduler and HTTP side.
    assert bundles[0] == {"GPU": 1, "CPU": 3.0} and len(bundles) == 8 and all(b["GPU"] == 1 for b in bundles)
    assert c.scaling.autoscaling_config() == {"min_replicas": 3, "max_replicas": 3, "initial_replicas": 3,
                                              "target_ongoing_requests": 32.0}
    d = AppConfig.from_env({})
    assert (d.group.tp, d.group.use_gpu, d.api.admin_token, d.embedded.local_s3, d.embedded.seed_model) == (
        3, False, "", True, True)
    assert d.api.model_name == "SmolLM2-135M-Instruct" and Path(d.group.model_path).is_absolute()
    assert [b.get("GPU", 0) for b in d.group.bundles()] == [0, 0, 0]
    tiny = AppConfig.from_env({"BDLORA_DEMO_MODEL": "tiny"})
    assert (tiny.group.tp, tiny.api.model_name) == (2, "tiny-llama")
    s = AppConfig.from_env({"BDLORA_MIN_GROUPS": "2", "BDLORA_MAX_GROUPS": "5"}).scaling
    assert (s.min_groups, s.max_groups) == (2, 5)
    for bad in ({"BDLORA_TP": "two"}, {"BDLORA_USE_GPU": "maybe"}, {"BDLORA_DEMO_MODEL": "gpt-9"}, {"BDLORA_MIN_GROUPS": "3", "BDLORA_MAX_GROUPS": "2"}):
        with pytest.raises(ValueError, match="BDLORA_|groups"):
            AppConfig.from_env(bad)
    with pytest.raises(ValueError, match="unknown engine settings"):
        AppConfig.from_env({"BDLORA_ENGINE_WARP_DRIVE": "1"})


def test_importing_deploy_starts_nothing_and_app_is_built_from_the_environment():
    code = ("import ray, deploy; app = deploy.app; "
            "from ray.serve import Application; assert isinstance(app, Application); "
            "print(ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         env={"PATH": "/usr/bin:/bin", "BDLORA_TP": "4", "HOME": "/tmp"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---- the Serve application, end to end ------------------------------------------------------------

SERVE_APP = "bdlora-test"


@dataclass(frozen=True)
class Served:
    kind: str                 # "fake": fake groups; "engine": real TP=2 EngineGroups
    n_groups: int             # 2: an Ingress routes to them; 1: the group's replica serves the API itself
    url: str
    groups: Any               # DeploymentHandle of the replica groups
    adapters: tuple[str, ...]  # three servable adapters
    models: tuple[str, ...]   # what /v1/models lists


@pytest.fixture(scope="module", params=[("fake", 2), ("fake", 1), ("engine", 2)],
                ids=["fake", "fake-one-group", "engine"])
def served(request, ray_session, tmp_path_factory):
    """The app on 127.0.0.1:<free port>, as `serve run deploy:app` runs it: two replica groups behind an
    Ingress, or one group whose replica serves the API itself (deploy/app.py)."""
    kind, n_groups = request.param
    import ray.cloudpickle
    from ray import serve

    from deploy.seed import DEMO_ADAPTERS, DemoAdapter, seed_adapters, write_checkpoint

    affinity = tuple(f"aff-{i}" for i in range(4))  # fresh adapters for the routing test
    if kind == "fake":
        # The fake groups live in this test module, which Serve's workers cannot import: ship it by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        spec = GroupConfig(model_path=f"/nonexistent/{BASE}", tp=2, worker_cpus=0.2)
        factory, adapters, models = functools.partial(FakeGroup, load_delay_s=0.3), ("alpha", "beta", "gamma"), (
            BASE, "alpha", "beta")
    else:
        s3 = request.getfixturevalue("s3_server")
        d = tmp_path_factory.mktemp("served")
        model = write_checkpoint(d / BASE)
        uri = f"s3://{s3.create_bucket('served-adapters')}/adapters"
        extra = tuple(DemoAdapter(n, rank=8, block_diagonal=False, mode="replicated", seed=20 + i)
                      for i, n in enumerate(affinity))
        names = seed_adapters(model, d / "peft", uri, 2, DEMO_ADAPTERS + extra)
        spec = GroupConfig(model_path=str(model), adapters_uri=uri, tp=2, worker_cpus=0.2,
                           engine=EngineConfig(max_model_len=128), env_vars=without_credentials(s3.env))
        factory, adapters, models = None, tuple(names[:3]), (BASE, *sorted(names))
    config = AppConfig(group=spec, scaling=ScalingConfig(min_groups=n_groups, max_groups=n_groups))
    assert config.api_in_group == (n_groups == 1)
    with serve_app(config, factory, SERVE_APP) as url:
        yield Served(kind, n_groups, url, serve.get_deployment_handle("EngineGroup", SERVE_APP), adapters, models)


def _group_stats(groups) -> dict[str, dict]:
    """Each replica group's stats, by replica id."""
    return {s["replica"]: s for s in groups.broadcast("stats").results(timeout_s=60)}


@pytest.mark.slow
def test_served_openai_client_completions_chat_streams_models_and_errors(served):
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    greedy = {"temperature": 0, "extra_body": {"ignore_eos": True}}
    models = (BASE, *served.adapters)

    def complete(model: str, n: int = 6):
        return client.completions.create(model=model, prompt="hello", max_tokens=n, **greedy)

    alone = {m: complete(m) for m in models}
    for m, r in alone.items():
        assert r.model == m and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6
        if served.kind == "fake":
            assert r.choices[0].text == fake_text(m, 6)
    assert len({r.choices[0].text for r in alone.values()}) == len(models)  # each adapter changes the output
    # Several adapters at once, batched together: the same greedy outputs as one at a time.
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda m: complete(m).choices[0].text, models * 3))
    assert together == [alone[m].choices[0].text for m in models * 3]
    stream = client.completions.create(model=served.adapters[1], prompt="hello", max_tokens=6, stream=True, **greedy)
    assert "".join(ch.choices[0].text for ch in stream) == alone[served.adapters[1]].choices[0].text
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=served.adapters[2], messages=messages, max_tokens=4, **greedy)
    chunks = list(client.chat.completions.create(model=served.adapters[2], messages=messages, max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}, **greedy))
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 4
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4
    assert [m.id for m in client.models.list().data] == list(served.models)
    if served.kind == "engine":  # the newer parameters across processes: ingress -> group replica -> engine
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        r = client.chat.completions.create(
            model=f"{BASE}:{served.adapters[0]}", messages=messages, max_tokens=30, n=2, seed=3, logprobs=True,
            top_logprobs=2, response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": schema}})
        for ch in r.choices:
            assert json.loads(ch.message.content)["ok"] in (True, False) and ch.finish_reason == "stop"
            assert "".join(c.token for c in ch.logprobs.content) == ch.message.content
        assert client.models.retrieve(f"{BASE}:{served.adapters[1]}").model_extra["parent"] == BASE
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=served.adapters[0], prompt="x", temperature=7)
    assert e.value.body["param"] == "temperature"
    assert complete(served.adapters[0]).choices[0].text == alone[served.adapters[0]].choices[0].text
    assert httpx.get(f"{served.url}/health", timeout=60).json() == {"status": "ok"}
    metrics = httpx.get(f"{served.url}/metrics", timeout=60).text
    assert f"bdlora_groups {served.n_groups}.0" in metrics and 'bdlora_requests_total{route="/v1/completions",status="404"} 1.0' in metrics


@pytest.mark.slow
def test_served_requests_for_an_adapter_go_to_the_group_that_holds_it(served):
    if served.n_groups == 1:
        pytest.skip("one group: no routing between groups (its replica serves the API)")
    url, groups = served.url, served.groups

    def complete(name: str) -> None:
        r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text

    def holders(name: str) -> set[str]:
        return {rid for rid, s in _group_stats(groups).items() if name in s["resident_adapters"]}

    # Serve learns which group holds an adapter asynchronously (replica -> controller -> ingress);
    # a request racing that news may load it in the other group too. Try fresh adapters until one
    # is held by exactly one group once the news has spread (five requests in a row load nothing).
    for name in (f"aff-{i}" for i in range(4)):
        r = httpx.post(f"{url}/v1/adapters", json={"name": name}, timeout=120)
        assert r.status_code == 200, r.text
        # The news travels replica -> controller -> ingress with nothing to observe it by; a request
        # sent at once goes to the group with the fewest adapters, the other one. Give it a moment.
        time.sleep(2.0)
        complete(name)  # makes it resident in the pool of the group that got it
        streak, deadline = 0, time.monotonic() + 60
        while streak < 5 and time.monotonic() < deadline:
            before = holders(name)
            complete(name)
            streak = streak + 1 if holders(name) == before else 0
        if streak >= 5 and len(holders(name)) == 1:
            break
    else:
        pytest.fail("no adapter ended up held by a single group: requests do not follow adapter affinity")
    (holder,) = holders(name)
    before = _group_stats(groups)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(complete, [name] * 12))
    after = _group_stats(groups)
    assert {rid: s["requests_per_adapter"].get(name, 0) - before[rid]["requests_per_adapter"].get(name, 0)
            for rid, s in after.items()} == {rid: (12 if rid == holder else 0) for rid in after}
    assert all(s["counters"].get("adapter_fetches", 0) == before[rid]["counters"].get("adapter_fetches", 0)
               for rid, s in after.items())  # loaded nowhere again
    # Unload reaches every group; the adapter is gone from the holder's pool.
    r = httpx.delete(f"{url}/v1/adapters/{name}", timeout=120)
    assert r.status_code == 200 and r.json()["groups"] == 2
    assert holders(name) == set()


@pytest.mark.slow
def test_served_stream_is_aborted_when_the_client_disconnects(served):
    url, groups = served.url, served.groups
    model, n = ("slow", 10) if served.kind == "fake" else (BASE, 100)
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"model": model, "prompt": "x", "max_tokens": n, "stream": True,
                            "ignore_eos": True}) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["object"] == "text_completion"
    # Closing the connection cancels the ingress request, which cancels the group's call, which aborts.
    wait_until(lambda: sum(s["counters"].get("finished_abort", 0) for s in _group_stats(groups).values()) == 1,
                60, "the abort")


@pytest.mark.slow
def test_served_whole_request_is_aborted_when_the_client_disconnects(served):
    """A request that is not streamed travels as one plain call to its group (no stream of one item):
    a client that leaves before its answer cancels that call, which aborts the request."""
    url, groups = served.url, served.groups
    model, n = ("slow", 10) if served.kind == "fake" else (BASE, 120)

    def aborts() -> int:
        return sum(s["counters"].get("finished_abort", 0) for s in _group_stats(groups).values())

    def running() -> int:
        return sum(s.get("running", 0) for s in _group_stats(groups).values())

    def started() -> int:  # requests the groups have begun to run for `model`
        key = "" if model == BASE else model
        return sum(s["requests_per_adapter"].get(key, 0) for s in _group_stats(groups).values())

    async def leave_once_running(begun: int) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            call = asyncio.create_task(client.post(f"{url}/v1/completions", json={
                "model": model, "prompt": "x", "max_tokens": n, "ignore_eos": True}))
            while not call.done() and await asyncio.to_thread(started) == begun:
                await asyncio.sleep(0.02)
            assert not call.done(), "the request ended before the client could leave"
            call.cancel()  # the client gives up: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await call

    before = aborts()
    asyncio.run(leave_once_running(started()))
    wait_until(lambda: aborts() == before + 1, 60, "the abort")
    wait_until(lambda: running() == 0 or served.kind == "fake", 60, "its batch slot and pages freed")


def test_sse_events_survive_readers_that_split_lines_like_str_splitlines():
    # httpx's iter_lines splits at U+0085, U+2028 and U+2029 too; JSON leaves them raw.
    text = "a\u2028b\x85c\u2029d\r\ne\n\x1cf"
    lines = sse({"text": text}).splitlines()
    assert len(lines) == 2 and lines[1] == "" and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: "):]) == {"text": text}


@pytest.mark.slow
def test_served_group_replica_killed_mid_request_is_a_typed_503_from_the_ingress(served):
    """Behind the Ingress (several groups), the death of a group's replica (TP rank 0 runs in it) ends the
    requests in flight there with a typed 503, the other group keeps serving, and Serve rebuilds the
    group. (A one-group app's replica serves the API itself: its connections go with it, see
    tests/test_reliability.py.) Last for its app: it breaks a group."""
    if served.kind != "engine" or served.n_groups == 1:
        pytest.skip("needs real TP workers (their pids) behind an Ingress")
    url, groups = served.url, served.groups
    victim, stats = next(iter(_group_stats(groups).items()))
    pid = stats["workers"][0]["pid"]  # rank 0: the replica's own process

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", timeout=120,
                          json={"model": BASE, "prompt": "x", "max_tokens": 110, "ignore_eos": True})

    with ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(post, i) for i in range(8)]
        wait_until(lambda: _group_stats(groups)[victim].get("running", 0) > 0, 60, "requests on the victim group")
        os.kill(pid, signal.SIGKILL)
        responses = [c.result(timeout=120) for c in calls]  # bounded: each ends
    failed = [r for r in responses if r.status_code != 200]
    assert failed, "no request was running on the killed group"
    for r in failed:
        assert_openai_error(r, 503, "replica_group_failed")
        assert r.headers["retry-after"] == "5"
    assert all(r.json()["usage"]["completion_tokens"] == 110 for r in responses if r.status_code == 200)
    def rebuilt() -> bool:
        try:
            now = _group_stats(groups)
        except Exception:  # a broadcast that reached the dead replica
            return False
        return len(now) == 2 and victim not in now

    wait_until(rebuilt, 300, "Serve to rebuild the group", poll_s=1.0)
    assert post(0).status_code == 200 and httpx.get(f"{url}/health", timeout=60).json() == {"status": "ok"}
