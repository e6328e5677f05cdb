"""A local S3 server (moto) on 127.0.0.1: the embedded default's store, the benchmarks' and the tests'.

Clients reach it over HTTP exactly as they reach S3 or MinIO, through
`AWS_ENDPOINT_URL`; `LocalS3.env` holds the variables that point a process
(and a local Ray cluster started from it) at it. The credentials are fake:
moto takes any, and real ones must never reach a local server, so `env` also
hides the AWS config files.

    with LocalS3() as s3:                    # moto in a thread of this process, on a free port
        s3.create_bucket("adapters")
    with LocalS3(in_process=False) as s3:    # in a subprocess: its own GIL, for benchmarks
        ...
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

LOCAL_CREDENTIAL = "bdlora-local"  # access key, secret and session token alike
REGION = "us-east-1"


class LocalS3Error(RuntimeError):
    """The local S3 server could not start (moto missing, port taken, server exited or silent)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalS3:
    """One moto S3 server on 127.0.0.1:`port` (0: a free one); `start` it, or use it as a context manager."""

    def __init__(self, port: int = 0, in_process: bool = True, startup_timeout_s: float = 60.0) -> None:
        self.host, self.port, self.in_process = "127.0.0.1", port, in_process
        self.startup_timeout_s = startup_timeout_s
        self._server: Any = None                     # ThreadedMotoServer, in process
        self._proc: subprocess.Popen | None = None   # `python -m moto.server`, otherwise

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables that point clients at this server, with fake credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": LOCAL_CREDENTIAL,
                "AWS_SECRET_ACCESS_KEY": LOCAL_CREDENTIAL, "AWS_SESSION_TOKEN": LOCAL_CREDENTIAL,
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
                # Profiles and config files could point elsewhere; these variables alone decide.
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}

    def start(self) -> LocalS3:
        if self.port:
            # moto would wait forever for a server thread that died on a taken port: check it first.
            with socket.socket() as s:
                try:
                    s.bind((self.host, self.port))
                except OSError as e:
                    raise LocalS3Error(f"port {self.port} for the local S3 server is taken ({e})") from None
        if self.in_process:
            self._start_thread()
        else:
            self._start_process()
        log.info("local S3 (moto) at %s", self.endpoint)
        return self

    def _start_thread(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise LocalS3Error("the local S3 server needs moto: pip install 'moto[server]'") from None
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]

    def _start_process(self) -> None:
        self.port = self.port or free_port(self.host)
        # Its output is one access-log line per request: not kept.
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise LocalS3Error(f"the moto S3 server exited at start-up with {code} (is moto[server] installed?)")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise LocalS3Error(f"no S3 server on {self.endpoint} after {self.startup_timeout_s:.0f}s") from None
                time.sleep(0.1)  # another process's socket: nothing to await

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=LOCAL_CREDENTIAL, aws_secret_access_key=LOCAL_CREDENTIAL)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
