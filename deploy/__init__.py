"""The Ray Serve application: `serve run deploy:app` (configured by BDLORA_* variables, see deploy/config.py).

`app` is built on first access, from the environment at that moment, so
importing this package reads no configuration and starts nothing.
"""

from __future__ import annotations

from typing import Any

from deploy.config import AppConfig

__all__ = ["AppConfig", "app", "build_app"]


def build_app(config: AppConfig, factory: Any = None) -> Any:
    from deploy.app import build_app as _build

    return _build(config, factory)


def __getattr__(name: str) -> Any:
    if name == "app":  # `serve run deploy:app` resolves it with getattr
        return build_app(AppConfig.from_env())
    raise AttributeError(f"module 'deploy' has no attribute {name!r}")
