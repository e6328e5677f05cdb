"""S3 access for adapters: one bucket + prefix, names checked before they become keys.

Endpoint, credentials and region come from the usual AWS variables and files
(`AWS_ENDPOINT_URL` for S3-compatible servers such as MinIO or moto); boto3
reads them itself. Retries and timeouts are explicit here so that a slow or
dead store turns into `AdapterUnavailable` within a bounded time instead of
hanging a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from bdlora_ray.errors import (
    AdapterInvalid,
    AdapterNameInvalid,
    AdapterNotFound,
    AdapterUnavailable,
    BdloraError,
    log_incident,
)
from bdlora_ray.spec import S3Config  # noqa: F401  (defined without boto3: the engine imports it)
from bdlora_ray.store.manifest import MANIFEST, Manifest, check_name
from bdlora_ray.store.validate import describe_foreign_body

log = logging.getLogger(__name__)

_MISSING = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class AdapterInfo:
    name: str                # adapter name (its folder under the prefix)
    rank: int = 0            # global LoRA rank r (0 when the manifest is unreadable)
    mode: str = ""           # bd | slora | replicated
    tp: int = 0              # TP degree it is sharded for
    size: int = 0            # bytes of all shard files together
    base_model: str = ""     # base model it was cut for
    error: str | None = None  # why it cannot be served, None when it can

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def of(cls, name: str, m: Manifest) -> "AdapterInfo":
        return cls(name, m.meta.rank, m.meta.mode, m.meta.tp, m.total_size, m.base_name)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b/' -> ('bucket', 'a/b'); the prefix may be empty."""
    if not uri.startswith("s3://"):
        raise ValueError(f"expected an s3://bucket/prefix URI, got {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    prefix = prefix.rstrip("/")
    # S3 keys are literal, but proxies and S3-compatible servers may normalise these.
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"prefix of {uri!r} has an empty, '.' or '..' segment")
    return bucket, prefix


def make_client(config: S3Config = S3Config()):
    return boto3.session.Session().client("s3", config=config.botocore())


class AdapterBucket:
    """The adapters under one `s3://bucket/prefix`."""

    def __init__(self, uri: str, config: S3Config = S3Config(), client=None) -> None:
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = client if client is not None else make_client(config)

    def key(self, name: str, file: str) -> str:
        # The only place a name becomes a key: check it here too, whatever the caller did.
        check_name(name)
        return f"{self.prefix}/{name}/{file}" if self.prefix else f"{name}/{file}"

    def _error(self, e: Exception, what: str) -> Exception:
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                return AdapterNotFound(f"{what} not found")
            if code:
                return AdapterUnavailable(f"{what}: S3 error {code}")
            return AdapterUnavailable(f"{what}: S3 error (error id {log_incident(log, what, e)})")
        # The exception's text names endpoints and internals: the log has it, the client the id.
        return AdapterUnavailable(f"{what}: adapter store unreachable (error id {log_incident(log, what, e)})")

    def get(self, name: str, file: str, max_bytes: int, expected_size: int | None = None) -> bytes:
        """One object's bytes; AdapterInvalid if its size is wrong or above `max_bytes`.

        The size is checked from the response headers before the body is read,
        so an oversized or wrong object costs no download.
        """
        what = f"adapter {name!r} file {file}"
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(name, file))
            body = resp["Body"]
            try:
                length = int(resp.get("ContentLength", -1))
                if length > max_bytes or (expected_size is not None and length != expected_size):
                    head = body.read(512) if length <= 4096 else b""
                    raise AdapterInvalid(f"{what} is {length} bytes, expected "
                                         f"{expected_size if expected_size is not None else f'<= {max_bytes}'}"
                                         f"{describe_foreign_body(head)}")
                data = body.read(max_bytes + 1)  # bounded even if the header lied
            finally:
                body.close()
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, what) from None
        if len(data) > max_bytes:
            raise AdapterInvalid(f"{what} is larger than {max_bytes} bytes")
        return data

    def put(self, name: str, file: str, data: bytes, progress: Callable[[int], None] | None = None) -> None:
        """Upload `data` (multipart for large files); `progress(n)` gets bytes sent."""
        try:
            self.client.upload_fileobj(BytesIO(data), self.bucket, self.key(name, file), Callback=progress)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, f"uploading {name}/{file}") from None

    def upload_adapter(self, name: str, manifest: Manifest, blobs: list[bytes],
                       progress: Callable[[int], None] | None = None) -> None:
        """Upload the shard files, then the manifest: a visible manifest means a complete adapter."""
        for f, data in zip(manifest.files, blobs, strict=True):
            self.put(name, f.name, data, progress)
        self.put(name, MANIFEST, manifest.to_json())

    def names(self) -> list[str]:
        """Adapter folder names under the prefix (invalid names are skipped, with a warning)."""
        base = f"{self.prefix}/" if self.prefix else ""
        names = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/")
            for page in pages:
                for cp in page.get("CommonPrefixes", []):
                    name = cp["Prefix"][len(base):].rstrip("/")
                    try:
                        names.append(check_name(name))
                    except AdapterNameInvalid:
                        log.warning("skipping %s%s/: not a valid adapter name", base, name)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, f"listing {self.uri}") from None
        return sorted(names)

    def manifest(self, name: str, max_bytes: int = 1 << 20) -> Manifest:
        return Manifest.from_json(self.get(name, MANIFEST, max_bytes), what=f"adapter {name!r} manifest")

    def catalog(self, manifest: Callable[[str], Manifest] | None = None) -> list[AdapterInfo]:
        """Every adapter under the prefix; one whose manifest fails carries its error.

        `manifest(name)` reads (and may check) a manifest; default: `self.manifest`.
        An unreachable store is still AdapterUnavailable (the listing would be wrong, not short);
        anything else one adapter raises stays with that adapter: one bad object never fails the
        listing of the others.
        """
        read = manifest or self.manifest
        infos = []
        for name in self.names():
            try:
                infos.append(AdapterInfo.of(name, read(name)))
            except AdapterUnavailable:
                raise
            except BdloraError as e:
                infos.append(AdapterInfo(name, error=f"{type(e).__name__}: {e}"))
            except Exception as e:
                error_id = log_incident(log, f"listing adapter {name!r}: unexpected failure", e)
                infos.append(AdapterInfo(name, error=f"unexpected failure (error id {error_id})"))
        broken = [i.name for i in infos if i.error]
        if broken:
            log.warning("%d adapters under %s cannot be served: %s%s", len(broken), self.uri, ", ".join(broken[:10]),
                        " ..." if len(broken) > 10 else "")
        return infos

