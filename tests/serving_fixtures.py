"""Helpers shared by the tests that run the Serve application over HTTP (test_api, test_reliability_*)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx

from deploy.local_s3 import free_port

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.1) -> T:
    """The first truthy value of `condition()`, polled until `timeout_s`; AssertionError after that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)  # polling another process's state: nothing to await here
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def drained_pool(pool_usage: Callable[[], list[dict]]) -> list[dict]:
    """Every rank's pool usage (`pool_usage()`) once no sequence is left on any rank: a response may reach
    the client a turn of the engine loop before its sequence's pages are freed on every rank."""
    def drained() -> list[dict] | None:
        usage = pool_usage()
        return usage if all(u["sequences"] == 0 for u in usage) else None

    return wait_until(drained, 30, "every sequence released on every rank")


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error body with `status` (and `code`, `param` when given); returns the `error` object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["message"] and err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@contextmanager
def serve_app(config: Any, factory: Any = None, app_name: str = "bdlora-test") -> Iterator[str]:
    """Run the application for `config` as `serve run deploy:app` does, on 127.0.0.1:<free port>;
    yields its URL. Needs a Ray session. Afterwards Serve is shut down and the named actors the
    app created (the detached adapter store) are removed, so a later app starts clean."""
    import ray
    from ray import serve

    from deploy import build_app

    def named_actors() -> set[tuple[str, str]]:
        return {(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)}

    named_before = named_actors()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config, factory), name=app_name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        # The store would outlive the app (and be found, with this app's bucket, by a later group
        # of the same model name): remove what this app made.
        for name, namespace in named_actors() - named_before:
            ray.kill(ray.get_actor(name, namespace=namespace))
