"""Metadata engines, chosen by URL scheme: ``open_engine(url)``."""
from __future__ import annotations

import errno
import urllib.parse

from ..errors import FsError, QuietError
from .engine import Engine


def open_engine(url: str) -> Engine:
    """Open (not format) the engine for META_URL. QuietError(exit 3) on a bad URL."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("sqlite3", "sqlite"):
        from .sqlite import SqliteEngine

        return SqliteEngine(url)
    if scheme in ("redis", "rediss"):
        from .redis import RedisEngine  # noqa: F401  (issue 5)

        return RedisEngine(url)
    if scheme in ("postgres", "postgresql"):
        from .postgres import PostgresEngine  # noqa: F401  (issue 5)

        return PostgresEngine(url)
    raise QuietError(f"unknown metadata URL scheme {scheme!r} in {url!r} "
                     "(expected sqlite3://, redis:// or postgres://)", 3)


__all__ = ["Engine", "open_engine", "FsError", "errno"]
