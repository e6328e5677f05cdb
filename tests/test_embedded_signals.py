"""`make run` (python -m deploy.embedded) stops on SIGTERM as on Ctrl-C: in-flight requests end,
exit status 0, no native abort."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import psutil
import pytest

from serving_fixtures import free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("front", ["python", "haproxy"])
def test_sigterm_stops_make_run_cleanly_and_ends_in_flight_requests(tmp_path, front):
    port, s3_port = free_port(), free_port()
    # The tiny random model: what is tested is stopping, not the demo model. Behind either HTTP front
    # (BDLORA_HTTP_FRONT, deploy/cluster_env.py).
    env = {**os.environ, "BDLORA_DEMO_MODEL": "tiny", "BDLORA_STATE_DIR": str(tmp_path / "state"),
           "BDLORA_PORT": str(port), "BDLORA_S3_PORT": str(s3_port), "RAY_AUTH_MODE": "disabled",
           "BDLORA_HTTP_FRONT": front}
    for k in [k for k in env if k.startswith("AWS_")]:
        del env[k]  # the embedded default brings its own local S3
    proc = subprocess.Popen([sys.executable, "-m", "deploy.embedded"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, "".join(out)[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 240, "make run to serve", poll_s=1.0)
        listening = {psutil.Process(c.pid).name() for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
        assert ("haproxy" in listening) == (front == "haproxy"), listening
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": model, "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(120), "".join(out)[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(out)[-3000:]
        t.join(timeout=60)
        assert not t.is_alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    log = "".join(out)
    assert "Aborted" not in log and "SIGTERM received" not in log, log[-3000:]
    # The stream ended as a stream does (finished, or cut short with an error event), not dropped.
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert "error" in last or last["choices"][0]["finish_reason"] == "length", last
