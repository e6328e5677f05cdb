"""Environment variables set for the length of a block, restored afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def patched_env(values: dict[str, str], drop: tuple[str, ...] = ()) -> Iterator[None]:
    """Set `values` and unset `drop` in os.environ, restoring every one of them afterwards."""
    keys = set(values) | set(drop)
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for k in drop:
            os.environ.pop(k, None)
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
