"""The embedded metadata engine: SQLite through the SQL engine (sql.py).

URL: ``sqlite3://PATH[?sync=full|normal&busy_timeout=MS]`` (scheme ``sqlite``
is accepted too).  PATH is everything between ``://`` and ``?``, taken
literally (no percent-decoding), as ``config.sqlite_path`` does:

* ``sqlite3:///abs/dir/vol.db``  an absolute path;
* ``sqlite3://vol.db``, ``sqlite3://dir/vol.db``  relative to the working
  directory *when the engine is opened* (it is made absolute then).
``:memory:`` and an empty path are refused: every transaction takes its own
pooled connection, so the database must be a file.

Durability.  The database is in WAL mode with ``synchronous=FULL`` by default:
every commit fsyncs the WAL, so a committed transaction survives ``kill -9``
*and* power loss.  ``?sync=normal`` skips that fsync (WAL + NORMAL still
survives a process crash, not a power cut) for a few hundred µs less per write
transaction on a real disk.

Concurrency.  Any number of threads may call the engine: each transaction
takes a connection from the pool.  Write transactions start with ``BEGIN
IMMEDIATE`` (the database write lock is taken up front, so a transaction never
fails half-way on a lock upgrade) under a per-file lock shared by every engine
of the process, so threads queue on a cheap mutex rather than in SQLite's
sleeping busy handler; other processes are waited for by ``busy_timeout`` and
then by the engine's bounded retry.  Readers never block in WAL mode.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import urllib.parse
from typing import Any

from ..errors import FsError, QuietError
from .sql import Dialect, SqlEngine

#: Per database file (realpath): the lock held around write transactions in this process.
_write_locks: dict[str, threading.Lock] = {}
_write_locks_guard = threading.Lock()

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """(absolute database path, query options) of a sqlite3:// URL; QuietError(3) if bad."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("sqlite3", "sqlite"):
        raise QuietError(f"not a sqlite3:// URL: {url!r}", 3)
    path, _, query = rest.partition("?")
    if not path or path == ":memory:":
        raise QuietError(f"{url!r}: a sqlite3 URL needs a database file path", 3)
    opts = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = set(opts) - {"sync", "busy_timeout"}
    if unknown:
        raise QuietError(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}", 3)
    if opts.get("sync", "full").lower() not in ("full", "normal"):
        raise QuietError(f"{url!r}: sync must be full or normal", 3)
    if not opts.get("busy_timeout", "1").isdigit():
        raise QuietError(f"{url!r}: busy_timeout must be milliseconds", 3)
    return os.path.abspath(path), opts


class SqliteDialect(Dialect):
    types: dict[str, str] = {}  # the canonical DDL is valid SQLite
    placeholder = "?"

    def __init__(self, path: str, sync: str = "full", busy_timeout_ms: int = 5000):
        self.path = path
        self.sync = sync.upper()
        self.busy_timeout_ms = busy_timeout_ms
        self.description = f"sqlite3://{path}"
        key = os.path.realpath(path)
        with _write_locks_guard:
            self._lock = _write_locks.setdefault(key, threading.Lock())

    def connect(self, create: bool) -> Any:
        if not create and not os.path.exists(self.path):
            raise FsError(errno.ENOENT, f"{self.path} does not exist (volume not formatted)")
        uri = "file:" + urllib.parse.quote(self.path) + ("?mode=rwc" if create else "?mode=rw")
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                                   timeout=self.busy_timeout_ms / 1000)
        except sqlite3.OperationalError as exc:
            raise FsError(errno.ENOENT if not os.path.exists(self.path) else errno.EIO,
                          f"cannot open {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise FsError(errno.EIO, f"{self.path}: cannot enable WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self.sync}")
            conn.execute("PRAGMA foreign_keys = OFF")
        except BaseException:
            conn.close()
            raise
        return conn

    def begin(self, conn: Any, write: bool) -> None:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def is_retryable(self, exc: BaseException) -> bool:
        if not isinstance(exc, sqlite3.OperationalError):
            return False
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return (code & 0xFF) in _BUSY_CODES
        msg = str(exc).lower()
        return "locked" in msg or "busy" in msg

    def is_db_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error)

    def table_exists(self, cur: Any, name: str) -> bool:
        cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return cur.fetchone() is not None

    def column_exists(self, cur: Any, table: str, column: str) -> bool:
        # one writer per database file: a check and an ALTER in one write txn are atomic
        cur.execute("SELECT 1 FROM pragma_table_info(?) WHERE name = ?", (table, column))
        return cur.fetchone() is not None

    def write_lock(self) -> contextlib.AbstractContextManager:
        return self._lock


class SqliteEngine(SqlEngine):
    """The SQLite engine for ``sqlite3://`` URLs (see the module docstring)."""

    def __init__(self, url: str):
        path, opts = parse_url(url)
        super().__init__(SqliteDialect(path, sync=opts.get("sync", "full").lower(),
                                       busy_timeout_ms=int(opts.get("busy_timeout", 5000))))
        self.path = path
