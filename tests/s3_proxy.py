"""A loopback HTTP proxy in front of the test S3 server that logs and can break S3.

The served application's adapter store talks to S3 through it (its
AWS_ENDPOINT_URL), so a test sees exactly which keys the server read, and can
make S3 misbehave the way real S3 does:

- `down()` / `up()`: stop listening and drop open connections (connection
  refused, as for an unreachable endpoint), then listen again on the same port;
- `fault(match, "slowdown")`: answer matching requests with 503 SlowDown
  (S3's throttling answer, which clients retry with backoff);
- `fault(match, action, hold=True)`: keep matching requests waiting until the
  fault's `release` is set (a slow download that a test controls), then
  forward them ("forward") or answer SlowDown ("slowdown").

`match(method, key)` gets the HTTP method and the object key (bucket and query
left out); faults apply in the order they were added, first match wins.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
HOLD_LIMIT_S = 60.0  # a held request is forwarded after this even if never released: nothing hangs forever


@dataclass(frozen=True)
class Seen:
    method: str
    bucket: str
    key: str      # object key, percent-decoded ("" for bucket-level calls such as listing)
    query: str
    status: int   # what the proxy answered


@dataclass
class Fault:
    match: Callable[[str, str], bool]
    action: str                                            # "forward" | "slowdown"
    hold: bool = False                                     # wait for `release` first
    release: threading.Event = field(default_factory=threading.Event)
    hits: int = 0                                          # requests it applied to (held ones included)


class S3Proxy:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- control ---------------------------------------------------------------------------------

    def up(self) -> None:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)  # SO_REUSEADDR: same port again
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, name="s3-proxy", daemon=True).start()

    def down(self) -> None:
        """Refuse connections from now on, and cut the open ones (clients keep connections alive)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client

    def fault(self, match: Callable[[str, str], bool], action: str, hold: bool = False) -> Fault:
        assert action in ("forward", "slowdown"), action
        f = Fault(match, action, hold)
        with self._lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        """Remove every fault, releasing the held requests."""
        with self._lock:
            faults, self.faults = self.faults, []
        for f in faults:
            f.release.set()

    def stop(self) -> None:
        self.clear()
        self.down()

    # ---- what S3 saw -----------------------------------------------------------------------------

    def log(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def count(self, pred: Callable[[Seen], bool] = lambda s: True, since: int = 0) -> int:
        return sum(1 for s in self.log()[since:] if pred(s))

    def gets(self, key: str, since: int = 0) -> int:
        """GET requests for exactly this object key."""
        return self.count(lambda s: s.method == "GET" and s.key == key, since)

    # ---- used by the handler ---------------------------------------------------------------------

    def _fault_for(self, method: str, key: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.match(method, key):
                    f.hits += 1
                    return f
        return None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)


class _Handler(BaseHTTPRequestHandler):
    owner: S3Proxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def setup(self) -> None:
        super().setup()
        self.owner._track(self.connection, True)

    def finish(self) -> None:
        self.owner._track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args) -> None:
        log.debug(format, *args)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        f = self.owner._fault_for(self.command, key)
        if f is not None and f.hold:
            f.release.wait(HOLD_LIMIT_S)
        if f is not None and f.action == "slowdown":
            status, headers, data = 503, [("Content-Type", "application/xml")], SLOWDOWN
        else:
            status, headers, data = self._forward(body)
        self.owner._record(Seen(self.command, bucket, key, url.query, status))
        self.send_response(status)
        length = str(len(data))
        for k, v in headers:
            if k.lower() == "content-length" and self.command == "HEAD":
                length = v  # the object's size; a HEAD answer has no body
            elif k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
