"""Typed errors. Each carries the HTTP status the serving layer answers with."""

from __future__ import annotations

import logging
import uuid


class BdloraError(Exception):
    """Base class; `http_status` is what the API returns for it."""

    http_status = 500
    code = "internal_error"


class InvalidRequest(BdloraError):
    http_status = 400
    code = "invalid_request_error"


class AdapterNotFound(BdloraError):
    http_status = 404
    code = "model_not_found"


class AdapterInvalid(BdloraError):
    """An adapter exists but cannot be served: corrupt, wrong shapes, unsupported."""

    http_status = 422
    code = "adapter_invalid"


class AdapterUnavailable(BdloraError):
    """The adapter store cannot be reached right now; the client may retry."""

    http_status = 503
    code = "adapter_unavailable"
    retry_after_s = 5


class AdapterInUse(BdloraError):
    """An adapter cannot be unloaded while running requests use it."""

    http_status = 409
    code = "adapter_in_use"


class PoolExhausted(BdloraError):
    """The unified page pool has no free (or evictable) pages for a request."""

    http_status = 503
    code = "pool_exhausted"
    retry_after_s = 1


class Overloaded(BdloraError):
    http_status = 503
    code = "overloaded"
    retry_after_s = 1


class AdapterNameInvalid(InvalidRequest):
    """An adapter name that can never exist: not `^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`, or has `..`."""

    code = "invalid_adapter_name"


class ReplicaGroupFailed(BdloraError):
    """A TP worker of the replica group died; in-flight requests end with this while
    the group is rebuilt. The client may retry."""

    http_status = 503
    code = "replica_group_failed"
    retry_after_s = 5


def error_from_name(name: str | None, message: str) -> BdloraError:
    """Rebuild a typed error from its class name (errors cross threads and actors as data)."""
    cls = globals().get(name or "")
    if isinstance(cls, type) and issubclass(cls, BdloraError):
        return cls(message)
    return BdloraError(message)


def log_incident(logger: logging.Logger, what: str, exc: BaseException | None = None) -> str:
    """Log an unexpected failure (with its traceback when `exc` is given) under a fresh error id and
    return the id.

    Clients get the id, never the exception's text (it may name files, hosts or internals); an
    operator finds the details in the log by the id.
    """
    error_id = uuid.uuid4().hex[:16]
    logger.error("%s [error id %s]", what, error_id, exc_info=exc)
    return error_id
