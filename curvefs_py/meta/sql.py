"""The SQL metadata engine, shared by the SQLite and (later) PostgreSQL dialects.

Design (DESIGN §4, STYLE §6.3 rules 3–4; tables and invariants: schema.py):

* Every public method runs exactly one transaction: ``self._txn(fn, write)``
  takes a pooled connection, begins (``Dialect.begin``: SQLite ``BEGIN
  IMMEDIATE`` for writes), calls ``fn(tx)`` and commits.  ``fn`` is plain
  blocking code with no side effects outside the database, so a transaction
  that hits a busy/conflict error (``Dialect.is_retryable``) is rolled back and
  run again from the start, at most ``MAX_ATTEMPTS`` times with jittered
  exponential backoff (counted in ``meta_txn_retries``); then ``MetaError``.
  An ``FsError`` raised by ``fn`` rolls the transaction back: nothing of a
  failed operation is ever committed.  Latency of whole calls, retries
  included, is observed as ``meta_txn``.
* SQL is written once with ``?`` placeholders; ``Dialect.sql`` rewrites it for
  drivers with another paramstyle.  Only portable SQL is used (``ON CONFLICT
  ... DO NOTHING`` works on SQLite ≥ 3.24 and PostgreSQL ≥ 9.5).
* Connections come from a small pool, one connection per transaction at a
  time, so any number of worker threads may call the engine concurrently.
* Slice compaction: appending a slice to a chunk deletes the rows that no
  longer show through (``hidden_rows``, over ``layout.overlay``) and queues
  their ids in ``delslices`` once no row names them.  Only rows overlapping the
  new slice can become hidden, so only the window of rows around it is read.
"""
from __future__ import annotations

import abc
import contextlib
import errno
import json
import logging
import random
import stat
import threading
import time
from typing import Any, Callable, Iterable, Optional, TypeVar

from .. import ROOT_INODE
from .. import metrics
from ..chunk.layout import overlay
from ..errors import FsError, MetaError
from ..types import Attr, DirEntry, Format, SetAttr, Slice, StatFs, Usage
from . import schema
from .engine import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE, Engine, IsOpen

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds one attempt of a transaction may take before its connection is cut (a
#: server that stopped answering: the caller gets EIO, as after an S3 outage).
TXN_DEADLINE_S = 30.0
#: Attempts of one transaction before MetaError (busy / serialization conflicts).
MAX_ATTEMPTS = 12
#: First backoff after a conflict, seconds; doubles per attempt up to BACKOFF_MAX.
BACKOFF_START = 0.002
BACKOFF_MAX = 0.5
#: Slice ids reserved per round trip by next_slice_id.
SLICE_ID_BATCH = 256
#: Reported when Format.capacity is 0 ("unlimited").
UNLIMITED_SPACE = 1 << 50  # 1 PiB
#: Free inodes reported when Format.inodes is 0 ("unlimited").
UNLIMITED_INODES = 1 << 32
#: Longest symlink target (PATH_MAX - 1), xattr name and value (Linux limits).
SYMLINK_MAX = 4095
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
DIR_LENGTH = 4096

_NODE_COLS = "ino, mode, nlink, uid, gid, rdev, length, atime, mtime, ctime, data_version"
_SLICE_COLS = "seq, pos, id, size, off, len"


class Dialect(abc.ABC):
    """What differs between SQL databases: connecting, beginning, errors, types."""

    #: DDL type substitutions for schema.render (e.g. {"BLOB": "BYTEA"})
    types: dict[str, str] = {}
    #: the driver's placeholder for "?" (sqlite3: "?", psycopg: "%s")
    placeholder = "?"
    #: a short description for logs (no secrets)
    description = ""

    @abc.abstractmethod
    def connect(self, create: bool) -> Any:
        """A new DB-API connection in autocommit mode (the engine issues BEGIN).
        ``create``: the database may be created (only ``init`` asks for it);
        otherwise a missing database is FsError(ENOENT)."""

    @abc.abstractmethod
    def begin(self, conn: Any, write: bool) -> None:
        """Start a transaction (serializable for writes)."""

    @abc.abstractmethod
    def is_retryable(self, exc: BaseException) -> bool:
        """A busy / lock / serialization error: roll back and run again."""

    @abc.abstractmethod
    def is_db_error(self, exc: BaseException) -> bool:
        """Any other error of the driver (becomes MetaError)."""

    @abc.abstractmethod
    def table_exists(self, cur: Any, name: str) -> bool:
        """Inside a transaction: does table ``name`` exist?"""

    @abc.abstractmethod
    def column_exists(self, cur: Any, table: str, column: str) -> bool:
        """Inside a transaction: does ``table`` have ``column``?"""

    #: how ALTER TABLE adds a column that another client may add at the same time
    add_column = "ADD COLUMN"

    def write_lock(self) -> contextlib.AbstractContextManager:
        """Held around every write transaction (SQLite: one writer per process)."""
        return contextlib.nullcontext()

    def usable(self, conn: Any) -> bool:
        """May ``conn`` go back to the pool? (False: it was closed or lost.)"""
        return True

    def deadline(self, conn: Any, seconds: Optional[float]) -> contextlib.AbstractContextManager:
        """Held around a transaction on ``conn``: a server that stops answering
        (not a closed connection) must not hang the caller forever."""
        return contextlib.nullcontext()

    def sql(self, text: str) -> str:
        if self.placeholder == "?":
            return text
        return text.replace("?", self.placeholder)


class Txn:
    """One open transaction: a cursor with small helpers (``?`` placeholders)."""

    __slots__ = ("cur", "_sql")

    def __init__(self, cur: Any, dialect: Dialect):
        self.cur = cur
        self._sql = dialect.sql

    def run(self, sql: str, *args) -> int:
        """Execute; the number of rows changed."""
        self.cur.execute(self._sql(sql), args)
        return self.cur.rowcount

    def many(self, sql: str, rows: Iterable[tuple]) -> None:
        rows = list(rows)
        if rows:
            self.cur.executemany(self._sql(sql), rows)

    def one(self, sql: str, *args) -> Optional[tuple]:
        self.cur.execute(self._sql(sql), args)
        return self.cur.fetchone()

    def all(self, sql: str, *args) -> list[tuple]:
        self.cur.execute(self._sql(sql), args)
        return self.cur.fetchall()

    def value(self, sql: str, *args, default: Any = None) -> Any:
        row = self.one(sql, *args)
        return default if row is None else row[0]


def _b(v: Any) -> bytes:
    """A BLOB column as bytes (drivers may return memoryview)."""
    return v if isinstance(v, bytes) else bytes(v)


def _now() -> int:
    return time.time_ns()


def hidden_rows(slices: list[Slice], chunk_size: int) -> set[int]:
    """Indices of the slices (in commit order) that show nowhere in the chunk.

    Each row is tagged with its own index before ``layout.overlay``, so a hole
    covered by a later hole counts as hidden too, and two rows naming the same
    object are judged apart (the object itself is queued for deletion only when
    no row names it any more)."""
    tagged = [Slice(pos=s.pos, id=i + 1, size=s.len, off=0, len=s.len) for i, s in enumerate(slices)]
    shown = {seg.id for seg in overlay(tagged, 0, chunk_size)}
    return {i for i in range(len(slices)) if i + 1 not in shown}


class SqlEngine(Engine):
    """The metadata engine over a SQL database (see the module docstring)."""

    def __init__(self, dialect: Dialect):
        super().__init__()
        self.dialect = dialect
        self._pool: list[Any] = []
        self._all_conns: list[Any] = []
        self._pool_lock = threading.Lock()
        self._slice_lock = threading.Lock()
        self._slice_next = 0
        self._slice_end = 0
        self._session_info: dict = {}
        self._closed = False
        self._has_versions = False  # the changelog has its version column (once seen)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.dialect.description}>"

    # ============================================================ transactions
    def _get_conn(self, create: bool) -> Any:
        with self._pool_lock:
            if self._closed:
                raise MetaError("engine is closed")
            if self._pool:
                return self._pool.pop()
        conn = self.dialect.connect(create)
        with self._pool_lock:
            self._all_conns.append(conn)
        return conn

    def _put_conn(self, conn: Any, broken: bool) -> None:
        with self._pool_lock:
            if broken or self._closed or not self.dialect.usable(conn):
                if conn in self._all_conns:
                    self._all_conns.remove(conn)
                with contextlib.suppress(Exception):
                    conn.close()
            else:
                self._pool.append(conn)

    def _txn(self, fn: Callable[[Txn], T], write: bool = True, create: bool = False,
             deadline: Optional[float] = TXN_DEADLINE_S) -> T:
        """Run ``fn(tx)`` as one transaction, retried on busy/conflict errors; one
        attempt may take ``deadline`` seconds (None: no limit, for whole-volume scans)."""
        with metrics.timer("meta_txn"):
            delay = BACKOFF_START
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    return self._attempt(fn, write, create, deadline)
                except FsError:
                    raise
                except Exception as exc:
                    if self.dialect.is_retryable(exc) and attempt < MAX_ATTEMPTS:
                        metrics.inc("meta_txn_retries")
                        log.debug("transaction conflict (attempt %d): %s", attempt, exc)
                        time.sleep(delay * (0.5 + random.random()))
                        delay = min(delay * 2, BACKOFF_MAX)
                        continue
                    if self.dialect.is_retryable(exc) or self.dialect.is_db_error(exc):
                        metrics.inc("meta_txn_errors")
                        raise MetaError(f"{self.dialect.description}: {exc}") from exc
                    raise
            raise AssertionError("unreachable")

    def _attempt(self, fn: Callable[[Txn], T], write: bool, create: bool, deadline: Optional[float]) -> T:
        conn = self._get_conn(create)
        broken = False
        try:
            with self.dialect.write_lock() if write else contextlib.nullcontext(), \
                    self.dialect.deadline(conn, deadline):
                self.dialect.begin(conn, write)
                try:
                    cur = conn.cursor()
                    try:
                        result = fn(Txn(cur, self.dialect))
                    finally:
                        with contextlib.suppress(Exception):
                            cur.close()
                    conn.commit()
                    return result
                except BaseException:
                    try:
                        conn.rollback()
                    except Exception:
                        broken = True
                    raise
        except BaseException as exc:
            if not isinstance(exc, FsError) and not self.dialect.is_retryable(exc):
                broken = broken or self.dialect.is_db_error(exc)
            raise
        finally:
            self._put_conn(conn, broken)

    # ================================================================ helpers
    @staticmethod
    def _fmt(tx: Txn) -> Format:
        raw = tx.value("SELECT value FROM setting WHERE name = ?", "format")
        if raw is None:
            raise FsError(errno.ENOENT, "volume not formatted")
        return Format.from_dict(json.loads(raw))

    @staticmethod
    def _counter(tx: Txn, name: str) -> int:
        return int(tx.value("SELECT value FROM counter WHERE name = ?", name, default=0))

    @staticmethod
    def _add_counter(tx: Txn, name: str, delta: int) -> int:
        """Add ``delta``; return the new value."""
        if delta:
            tx.run("UPDATE counter SET value = value + ? WHERE name = ?", delta, name)
        return int(tx.value("SELECT value FROM counter WHERE name = ?", name, default=0))

    @staticmethod
    def _node(tx: Txn, ino: int) -> Attr:
        row = tx.one(f"SELECT {_NODE_COLS} FROM node WHERE ino = ?", ino)
        if row is None:
            raise FsError(errno.ENOENT, f"inode {ino} not found")
        return Attr(*row)

    def _dir(self, tx: Txn, ino: int) -> Attr:
        a = self._node(tx, ino)
        if not a.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return a

    @staticmethod
    def _entry(tx: Txn, parent: int, name: bytes) -> Optional[int]:
        return tx.value("SELECT ino FROM edge WHERE parent = ? AND name = ?", parent, name)

    @staticmethod
    def _save(tx: Txn, a: Attr) -> None:
        tx.run("UPDATE node SET mode = ?, nlink = ?, uid = ?, gid = ?, rdev = ?, length = ?,"
               " atime = ?, mtime = ?, ctime = ?, data_version = ? WHERE ino = ?",
               a.mode, a.nlink, a.uid, a.gid, a.rdev, a.length, a.atime_ns, a.mtime_ns,
               a.ctime_ns, a.data_version, a.ino)

    @staticmethod
    def _dir_parent(tx: Txn, ino: int) -> int:
        return int(tx.value("SELECT parent FROM node WHERE ino = ?", ino, default=ROOT_INODE))

    def _is_ancestor(self, tx: Txn, anc: int, ino: int) -> bool:
        """Is directory ``anc`` equal to ``ino`` or on its path to the root?"""
        seen = set()
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INODE or ino in seen:
                return False
            seen.add(ino)
            ino = self._dir_parent(tx, ino)

    def _queue_deletes(self, tx: Txn, pairs: Iterable[tuple[int, int]]) -> None:
        """Queue slice objects for deletion unless a chunk row still names them."""
        for sid, size in pairs:
            if sid and tx.one("SELECT 1 FROM chunk WHERE id = ?", sid) is None:
                tx.run("INSERT INTO delslices (id, size) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                       sid, size)

    def _delete_inode(self, tx: Txn, a: Attr) -> None:
        """Remove an inode with no links left, queueing its slices."""
        ino = a.ino
        if a.is_file:
            pairs = tx.all("SELECT DISTINCT id, size FROM chunk WHERE ino = ? AND id <> 0", ino)
            tx.run("DELETE FROM chunk WHERE ino = ?", ino)
            self._queue_deletes(tx, pairs)
            self._add_counter(tx, "used_space", -schema.round_space(a.length))
        elif a.is_symlink:
            tx.run("DELETE FROM symlink WHERE ino = ?", ino)
        tx.run("DELETE FROM xattr WHERE ino = ?", ino)
        tx.run("DELETE FROM sustained WHERE ino = ?", ino)
        tx.run("DELETE FROM node WHERE ino = ?", ino)
        self._add_counter(tx, "used_inodes", -1)

    def _drop_link(self, tx: Txn, a: Attr, is_open: IsOpen, now: int) -> Attr:
        """One entry of non-directory ``a`` is gone (edge already deleted)."""
        a.nlink -= 1
        a.ctime_ns = now
        if a.nlink > 0:
            self._save(tx, a)
        elif is_open(a.ino):
            self._save(tx, a)
            tx.run("INSERT INTO sustained (sid, ino) VALUES (?, ?) ON CONFLICT (sid, ino) DO NOTHING",
                   self.sid, a.ino)
            self.sustained(a.ino)
        else:
            self._delete_inode(tx, a)
        return a

    def _maybe_delete(self, tx: Txn, ino: int) -> None:
        """Remove ``ino`` if it has no links and nobody sustains it."""
        row = tx.one(f"SELECT {_NODE_COLS} FROM node WHERE ino = ?", ino)
        if row is None:
            return
        a = Attr(*row)
        if a.nlink == 0 and tx.one("SELECT 1 FROM sustained WHERE ino = ?", ino) is None:
            self._delete_inode(tx, a)

    @staticmethod
    def _touch(tx: Txn, ino: int, now: int) -> None:
        tx.run("UPDATE node SET mtime = ?, ctime = ? WHERE ino = ?", now, now, ino)

    @staticmethod
    def _add_nlink(tx: Txn, ino: int, delta: int) -> None:
        tx.run("UPDATE node SET nlink = nlink + ? WHERE ino = ?", delta, ino)

    @staticmethod
    def _check_space(tx: Txn, fmt: Format, delta: int) -> None:
        if delta > 0 and fmt.capacity > 0:
            used = int(tx.value("SELECT value FROM counter WHERE name = ?", "used_space", default=0))
            if used + delta > fmt.capacity:
                raise FsError(errno.ENOSPC, "volume capacity exceeded")

    # ----------------------------------------------------------- slices
    def _append_slice(self, tx: Txn, ino: int, idx: int, s: Slice, chunk_size: int) -> None:
        """Append ``s`` to chunk (ino, idx) and compact away what it hides."""
        end = s.pos + s.len
        overlapped = tx.all(f"SELECT {_SLICE_COLS} FROM chunk WHERE ino = ? AND idx = ?"
                            " AND pos < ? AND pos + len > ?", ino, idx, end, s.pos)
        seq = int(tx.value("SELECT COALESCE(MAX(seq), 0) FROM chunk WHERE ino = ? AND idx = ?",
                           ino, idx, default=0)) + 1
        tx.run("INSERT INTO chunk (ino, idx, seq, pos, id, size, off, len)"
               " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ino, idx, seq, s.pos, s.id, s.size, s.off, s.len)
        if not overlapped:
            return  # nothing under the new slice: visibility of other rows is unchanged
        # Only rows overlapping ``s`` can become hidden; whether one of them is hidden
        # depends on the later rows overlapping it, all inside [lo, hi).  Hidden within
        # this window implies hidden in the whole chunk.
        lo = min([s.pos] + [r[1] for r in overlapped])
        hi = max([end] + [r[1] + r[5] for r in overlapped])
        rows = tx.all(f"SELECT {_SLICE_COLS} FROM chunk WHERE ino = ? AND idx = ?"
                      " AND pos < ? AND pos + len > ? ORDER BY seq", ino, idx, hi, lo)
        hidden = hidden_rows([Slice(pos=r[1], id=r[2], size=r[3], off=r[4], len=r[5]) for r in rows],
                             chunk_size)
        if not hidden:
            return
        dead = [rows[i] for i in sorted(hidden)]
        tx.many("DELETE FROM chunk WHERE ino = ? AND idx = ? AND seq = ?", [(ino, idx, r[0]) for r in dead])
        self._queue_deletes(tx, {(r[2], r[3]) for r in dead if r[2]})

    def _truncate(self, tx: Txn, a: Attr, length: int, chunk_size: int) -> None:
        """Shrink the slices of ``a`` to ``length`` (< a.length)."""
        last, p = divmod(length, chunk_size)
        first_gone = last if p == 0 else last + 1
        pairs = tx.all("SELECT DISTINCT id, size FROM chunk WHERE ino = ? AND idx >= ? AND id <> 0",
                       a.ino, first_gone)
        tx.run("DELETE FROM chunk WHERE ino = ? AND idx >= ?", a.ino, first_gone)
        self._queue_deletes(tx, pairs)
        if not p:
            return
        rows = tx.all("SELECT pos, id, size, off, len FROM chunk WHERE ino = ? AND idx = ? AND pos + len > ?"
                      " ORDER BY seq", a.ino, last, p)
        if any(seg.id for seg in overlay([Slice(*r) for r in rows], p, chunk_size - p)):
            # data shows past the new end: hide the rest of the boundary chunk with a
            # hole, so that growing the file again reads zeros
            self._append_slice(tx, a.ino, last, Slice(pos=p, id=0, size=0, off=0, len=chunk_size - p),
                               chunk_size)

    # ============================================================== lifecycle
    def init(self, fmt: Format, force: bool = False) -> None:
        def fn(tx: Txn) -> None:
            for stmt in schema.render(self.dialect.types):
                tx.run(stmt)
            raw = tx.value("SELECT value FROM setting WHERE name = ?", "format")
            if raw is not None:
                if not force:
                    raise FsError(errno.EEXIST, "a volume exists (use force to overwrite its settings)")
                old = Format.from_dict(json.loads(raw))
                if (old.chunk_size, old.block_size) != (fmt.chunk_size, fmt.block_size):
                    raise FsError(errno.EINVAL, "chunk_size and block_size of a volume cannot change")
            for name, value in (("format", fmt.to_dict()), ("schema", schema.SCHEMA_VERSION)):
                tx.run("INSERT INTO setting (name, value) VALUES (?, ?)"
                       " ON CONFLICT (name) DO UPDATE SET value = excluded.value", name, json.dumps(value))
            tx.many("INSERT INTO counter (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                    schema.COUNTERS.items())
            if tx.one("SELECT 1 FROM node WHERE ino = ?", ROOT_INODE) is None:
                now = _now()
                tx.run(f"INSERT INTO node ({_NODE_COLS}, parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       ROOT_INODE, stat.S_IFDIR | 0o777, 2, 0, 0, 0, DIR_LENGTH, now, now, now, 0,
                       ROOT_INODE)
                self._add_counter(tx, "used_inodes", 1)

        if fmt.chunk_size <= 0 or fmt.block_size <= 0:
            raise FsError(errno.EINVAL, "chunk_size and block_size must be positive")
        self._txn(fn, create=True)

    def load(self) -> Format:
        def fn(tx: Txn) -> Format:
            if not self.dialect.table_exists(tx.cur, "setting"):
                raise FsError(errno.ENOENT, "volume not formatted")
            return self._fmt(tx)

        return self._txn(fn, write=False)

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            conns, self._all_conns, self._pool = self._all_conns, [], []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    # =============================================================== sessions
    def new_session(self, info: dict) -> int:
        def fn(tx: Txn) -> int:
            sid = self._add_counter(tx, "next_session", 1) - 1
            tx.run("INSERT INTO session (sid, heartbeat, info) VALUES (?, ?, ?)",
                   sid, _now(), json.dumps(info))
            return sid

        self.sid = self._txn(fn)
        self._session_info = dict(info)
        return self.sid

    def heartbeat(self) -> None:
        sid, info = self.sid, self._session_info

        def fn(tx: Txn) -> bool:
            if tx.run("UPDATE session SET heartbeat = ? WHERE sid = ?", _now(), sid):
                return True
            tx.run("INSERT INTO session (sid, heartbeat, info) VALUES (?, ?, ?)", sid, _now(), json.dumps(info))
            return False

        if sid and not self._txn(fn):
            log.warning("session %d had been closed as stale by another client; registered again", sid)

    def close_session(self) -> None:
        sid = self.sid
        self._txn(lambda tx: self._close_session(tx, sid))
        self.sid = 0

    def _close_session(self, tx: Txn, sid: int) -> None:
        for (ino,) in tx.all("SELECT ino FROM sustained WHERE sid = ?", sid):
            tx.run("DELETE FROM sustained WHERE sid = ? AND ino = ?", sid, ino)
            self._maybe_delete(tx, ino)
        tx.run("DELETE FROM session WHERE sid = ?", sid)

    def clean_stale_sessions(self, max_age_s: float) -> list[int]:
        """Blocking. As the interface says; never closes this engine's own session."""
        def fn(tx: Txn) -> list[int]:
            cutoff = _now() - int(max_age_s * 1e9)
            sids = [int(r[0]) for r in tx.all("SELECT sid FROM session WHERE heartbeat < ? ORDER BY sid",
                                              cutoff) if r[0] != self.sid]
            for sid in sids:
                self._close_session(tx, sid)
            return sids

        return self._txn(fn)

    def list_sessions(self) -> list[dict]:
        rows = self._txn(lambda tx: tx.all("SELECT sid, heartbeat, info FROM session ORDER BY sid"),
                         write=False)
        return [{**json.loads(info), "sid": int(sid), "heartbeat": hb / 1e9} for sid, hb, info in rows]

    # ============================================================ change feed
    def publish(self, changes: list) -> None:
        """Blocking. Append changes of this session to the change log (one txn)."""
        if not changes:
            return
        sid, now = self.sid, _now()
        if not self._has_versions:
            self._txn(self._migrate_changelog)  # apart: DDL locks before the counter's row

        def fn(tx: Txn) -> None:
            if not self.dialect.table_exists(tx.cur, "changelog"):
                for stmt in schema.render(self.dialect.types):
                    if "changelog" in stmt:
                        tx.run(stmt)
                tx.run("INSERT INTO counter (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                       "next_change", 1)
            base = self._add_counter(tx, "next_change", len(changes)) - len(changes)
            tx.many("INSERT INTO changelog (seq, sid, ino, parent, name, ts, version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(base + i, sid, c.ino, c.parent, c.name, now, c.version) for i, c in enumerate(changes)])
            if base % 256 < len(changes):  # now and then: prune old rows
                tx.run("DELETE FROM changelog WHERE ts < ?", now - int(schema.CHANGELOG_KEEP_S * 1e9))

        self._txn(fn)
        self._has_versions = True

    def _migrate_changelog(self, tx: Txn) -> None:
        """A changelog table made before its version column gets it (-1 in old rows)."""
        if self.dialect.table_exists(tx.cur, "changelog") and not self._changelog_versions(tx):
            tx.run(f"ALTER TABLE changelog {self.dialect.add_column} version BIGINT NOT NULL DEFAULT -1")

    def _changelog_versions(self, tx: Txn) -> bool:
        """Inside a transaction, the changelog existing: has it the version column?
        (Once it has, it keeps it: remembered.)"""
        if not self._has_versions:
            self._has_versions = self.dialect.column_exists(tx.cur, "changelog", "version")
        return self._has_versions

    def changes_since(self, cursor: int, limit: int = 1000):
        """Blocking. See Engine.changes_since."""
        from .engine import Change

        def fn(tx: Txn):
            if not self.dialect.table_exists(tx.cur, "changelog"):
                return max(cursor, 0), []
            if cursor < 0:
                return max(int(self._counter(tx, "next_change")) - 1, 0), []
            version = "version" if self._changelog_versions(tx) else "-1"
            rows = tx.all(f"SELECT seq, sid, ino, parent, name, {version} FROM changelog WHERE seq > ?"
                          " ORDER BY seq LIMIT ?", cursor, limit)
            if not rows:
                return cursor, []
            out = [Change(int(seq), int(sid), int(ino), int(parent), _b(name), int(ver))
                   for seq, sid, ino, parent, name, ver in rows if sid != self.sid]
            return int(rows[-1][0]), out

        return self._txn(fn, write=False)

    # ==================================================================== ids
    def next_slice_id(self) -> int:
        with self._slice_lock:
            if self._slice_next >= self._slice_end:
                end = self._txn(lambda tx: self._add_counter(tx, "next_slice", SLICE_ID_BATCH))
                self._slice_next, self._slice_end = end - SLICE_ID_BATCH, end
            sid = self._slice_next
            self._slice_next += 1
            return sid

    # ============================================================== namespace
    def do_lookup(self, parent: int, name: bytes) -> Attr:
        def fn(tx: Txn) -> Attr:
            self._dir(tx, parent)
            if name == b".":
                return self._node(tx, parent)
            if name == b"..":
                return self._node(tx, self._dir_parent(tx, parent))
            ino = self._entry(tx, parent, name)
            if ino is None:
                raise FsError(errno.ENOENT, f"{name!r} not found")
            return self._node(tx, ino)

        return self._txn(fn, write=False)

    def do_getattr(self, ino: int) -> Attr:
        return self._txn(lambda tx: self._node(tx, ino), write=False)

    def do_setattr(self, ino: int, changes: SetAttr) -> Attr:
        def fn(tx: Txn) -> Attr:
            a = self._node(tx, ino)
            now = _now()
            changed = False
            if changes.mode is not None:
                a.mode = stat.S_IFMT(a.mode) | (changes.mode & 0o7777)
                changed = True
            if changes.uid is not None:
                a.uid, changed = changes.uid, True
            if changes.gid is not None:
                a.gid, changed = changes.gid, True
            if changes.length is not None:
                if a.is_dir:
                    raise FsError(errno.EISDIR, "truncate of a directory")
                if not a.is_file:
                    raise FsError(errno.EINVAL, "truncate of a special file")
                if changes.length != a.length:
                    fmt = self._fmt(tx)
                    delta = schema.round_space(changes.length) - schema.round_space(a.length)
                    self._check_space(tx, fmt, delta)
                    if changes.length < a.length:
                        self._truncate(tx, a, changes.length, fmt.chunk_size)
                    self._add_counter(tx, "used_space", delta)
                    a.length = changes.length
                    a.data_version += 1
                a.mtime_ns = now  # truncate(2) always updates mtime, as Linux does
                changed = True
            if changes.atime_ns is not None:
                a.atime_ns = now if changes.atime_ns == SetAttr.NOW else changes.atime_ns
                changed = True
            if changes.mtime_ns is not None:
                a.mtime_ns = now if changes.mtime_ns == SetAttr.NOW else changes.mtime_ns
                changed = True
            if changes.ctime_ns is not None:
                a.ctime_ns = now if changes.ctime_ns == SetAttr.NOW else changes.ctime_ns
            elif changed:
                a.ctime_ns = now
            if changed or changes.ctime_ns is not None:
                self._save(tx, a)
            return a

        return self._txn(fn)

    def do_mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                 rdev: int, target: Optional[bytes]) -> Attr:
        typ = stat.S_IFMT(mode) or stat.S_IFREG
        if typ not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK,
                       stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL, f"bad file type {typ:o}")
        if typ == stat.S_IFLNK:
            if target is None:
                raise FsError(errno.EINVAL, "symlink without target")
            if not target:
                raise FsError(errno.ENOENT, "empty symlink target")
            if len(target) > SYMLINK_MAX:
                raise FsError(errno.ENAMETOOLONG, "symlink target too long")
        mode = typ | (mode & 0o7777)

        def fn(tx: Txn) -> Attr:
            p = self._dir(tx, parent)
            if self._entry(tx, parent, name) is not None:
                raise FsError(errno.EEXIST, f"{name!r} exists")
            fmt = self._fmt(tx)
            if fmt.inodes > 0 and self._counter(tx, "used_inodes") >= fmt.inodes:
                raise FsError(errno.ENOSPC, "inode limit reached")
            ino = self._add_counter(tx, "next_inode", 1) - 1
            now = _now()
            is_dir = typ == stat.S_IFDIR
            a = Attr(ino=ino, mode=mode, nlink=2 if is_dir else 1, uid=uid, gid=gid,
                     rdev=rdev if typ in (stat.S_IFCHR, stat.S_IFBLK) else 0,
                     length=DIR_LENGTH if is_dir else len(target) if typ == stat.S_IFLNK else 0,
                     atime_ns=now, mtime_ns=now, ctime_ns=now)
            if p.mode & stat.S_ISGID:
                a.gid = p.gid
                if is_dir:
                    a.mode |= stat.S_ISGID
            tx.run(f"INSERT INTO node ({_NODE_COLS}, parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   a.ino, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.length, a.atime_ns, a.mtime_ns,
                   a.ctime_ns, a.data_version, parent if is_dir else 0)
            tx.run("INSERT INTO edge (parent, name, ino) VALUES (?, ?, ?)", parent, name, ino)
            if typ == stat.S_IFLNK:
                tx.run("INSERT INTO symlink (ino, target) VALUES (?, ?)", ino, target)
            tx.run("UPDATE node SET nlink = nlink + ?, mtime = ?, ctime = ? WHERE ino = ?",
                   1 if is_dir else 0, now, now, parent)
            self._add_counter(tx, "used_inodes", 1)
            return a

        return self._txn(fn)

    def do_unlink(self, parent: int, name: bytes, is_open: IsOpen) -> Attr:
        def fn(tx: Txn) -> Attr:
            self._dir(tx, parent)
            ino = self._entry(tx, parent, name)
            if ino is None:
                raise FsError(errno.ENOENT, f"{name!r} not found")
            a = self._node(tx, ino)
            if a.is_dir:
                raise FsError(errno.EISDIR, f"{name!r} is a directory")
            now = _now()
            tx.run("DELETE FROM edge WHERE parent = ? AND name = ?", parent, name)
            self._touch(tx, parent, now)
            return self._drop_link(tx, a, is_open, now)

        return self._txn(fn)

    def do_rmdir(self, parent: int, name: bytes) -> int:
        def fn(tx: Txn) -> int:
            self._dir(tx, parent)
            ino = self._entry(tx, parent, name)
            if ino is None:
                raise FsError(errno.ENOENT, f"{name!r} not found")
            a = self._node(tx, ino)
            if not a.is_dir:
                raise FsError(errno.ENOTDIR, f"{name!r} is not a directory")
            if tx.one("SELECT 1 FROM edge WHERE parent = ? LIMIT 1", ino) is not None:
                raise FsError(errno.ENOTEMPTY, f"{name!r} is not empty")
            now = _now()
            tx.run("DELETE FROM edge WHERE parent = ? AND name = ?", parent, name)
            self._delete_inode(tx, a)
            tx.run("UPDATE node SET nlink = nlink - 1, mtime = ?, ctime = ? WHERE ino = ?", now, now, parent)
            return ino

        return self._txn(fn)

    def do_rename(self, parent: int, name: bytes, newparent: int, newname: bytes,
                  flags: int, is_open: IsOpen) -> tuple[int, Optional[Attr]]:
        exchange = bool(flags & RENAME_EXCHANGE)

        def fn(tx: Txn) -> tuple[int, Optional[Attr]]:
            # the order of checks follows Linux do_renameat2 / vfs_rename
            self._dir(tx, parent)
            self._dir(tx, newparent)
            ino = self._entry(tx, parent, name)
            if ino is None:
                raise FsError(errno.ENOENT, f"{name!r} not found")
            dino = self._entry(tx, newparent, newname)
            if flags & RENAME_NOREPLACE and dino is not None:
                raise FsError(errno.EEXIST, f"{newname!r} exists")
            if exchange and dino is None:
                raise FsError(errno.ENOENT, f"{newname!r} not found")
            src = self._node(tx, ino)
            dst = self._node(tx, dino) if dino is not None else None
            if parent != newparent:
                if src.is_dir and self._is_ancestor(tx, ino, newparent):
                    raise FsError(errno.EINVAL, "cannot move a directory into itself")
                if dst is not None and dst.is_dir and self._is_ancestor(tx, dst.ino, parent):
                    raise FsError(errno.EINVAL if exchange else errno.ENOTEMPTY,
                                  "target is an ancestor of the source")
            if dino == ino:
                return ino, None  # same inode (same entry or hard links): nothing to do
            now = _now()
            if exchange:
                assert dst is not None
                tx.run("UPDATE edge SET ino = ? WHERE parent = ? AND name = ?", dst.ino, parent, name)
                tx.run("UPDATE edge SET ino = ? WHERE parent = ? AND name = ?", ino, newparent, newname)
                if parent != newparent:
                    if src.is_dir:
                        tx.run("UPDATE node SET parent = ? WHERE ino = ?", newparent, ino)
                    if dst.is_dir:
                        tx.run("UPDATE node SET parent = ? WHERE ino = ?", parent, dst.ino)
                    shift = int(src.is_dir) - int(dst.is_dir)  # subdirectories moving to newparent
                    if shift:
                        self._add_nlink(tx, parent, -shift)
                        self._add_nlink(tx, newparent, shift)
                for a in (src, dst):
                    tx.run("UPDATE node SET ctime = ? WHERE ino = ?", now, a.ino)
                self._touch(tx, parent, now)
                self._touch(tx, newparent, now)
                return ino, None

            replaced: Optional[Attr] = None
            if dst is not None:
                if src.is_dir and not dst.is_dir:
                    raise FsError(errno.ENOTDIR, f"{newname!r} is not a directory")
                if not src.is_dir and dst.is_dir:
                    raise FsError(errno.EISDIR, f"{newname!r} is a directory")
                if dst.is_dir and tx.one("SELECT 1 FROM edge WHERE parent = ? LIMIT 1", dst.ino) is not None:
                    raise FsError(errno.ENOTEMPTY, f"{newname!r} is not empty")
                tx.run("DELETE FROM edge WHERE parent = ? AND name = ?", newparent, newname)
                if dst.is_dir:
                    self._delete_inode(tx, dst)
                    self._add_nlink(tx, newparent, -1)
                    dst.nlink, dst.ctime_ns = 0, now
                    replaced = dst
                else:
                    replaced = self._drop_link(tx, dst, is_open, now)
            tx.run("DELETE FROM edge WHERE parent = ? AND name = ?", parent, name)
            tx.run("INSERT INTO edge (parent, name, ino) VALUES (?, ?, ?)", newparent, newname, ino)
            if src.is_dir and parent != newparent:
                tx.run("UPDATE node SET parent = ? WHERE ino = ?", newparent, ino)
                self._add_nlink(tx, parent, -1)
                self._add_nlink(tx, newparent, 1)
            tx.run("UPDATE node SET ctime = ? WHERE ino = ?", now, ino)
            self._touch(tx, parent, now)
            if newparent != parent:
                self._touch(tx, newparent, now)
            return ino, replaced

        return self._txn(fn)

    def do_link(self, ino: int, newparent: int, newname: bytes) -> Attr:
        def fn(tx: Txn) -> Attr:
            a = self._node(tx, ino)
            if a.is_dir:
                raise FsError(errno.EPERM, "hard link to a directory")
            if a.nlink == 0:
                raise FsError(errno.ENOENT, "inode was unlinked")
            self._dir(tx, newparent)
            if self._entry(tx, newparent, newname) is not None:
                raise FsError(errno.EEXIST, f"{newname!r} exists")
            now = _now()
            tx.run("INSERT INTO edge (parent, name, ino) VALUES (?, ?, ?)", newparent, newname, ino)
            a.nlink += 1
            a.ctime_ns = now
            self._save(tx, a)
            self._touch(tx, newparent, now)
            return a

        return self._txn(fn)

    def readlink(self, ino: int) -> bytes:
        def fn(tx: Txn) -> bytes:
            a = self._node(tx, ino)
            if not a.is_symlink:
                raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
            target = tx.value("SELECT target FROM symlink WHERE ino = ?", ino)
            if target is None:
                raise MetaError(f"symlink {ino} has no target")
            return _b(target)

        return self._txn(fn, write=False)

    def readdir(self, ino: int) -> list[DirEntry]:
        cols = ", ".join("n." + c.strip() for c in _NODE_COLS.split(","))

        def fn(tx: Txn) -> list[DirEntry]:
            self._dir(tx, ino)
            rows = tx.all(f"SELECT e.name, {cols} FROM edge e JOIN node n ON n.ino = e.ino"
                          " WHERE e.parent = ? ORDER BY e.name", ino)
            return [DirEntry(_b(r[0]), r[1], Attr(*r[1:])) for r in rows]

        return self._txn(fn, write=False)

    def statfs(self) -> StatFs:
        def fn(tx: Txn) -> StatFs:
            fmt = self._fmt(tx)
            used, inodes = self._counter(tx, "used_space"), self._counter(tx, "used_inodes")
            total = fmt.capacity if fmt.capacity > 0 else UNLIMITED_SPACE
            avail_inodes = max(0, fmt.inodes - inodes) if fmt.inodes > 0 else UNLIMITED_INODES
            return StatFs(total_space=total, avail_space=max(0, total - used),
                          used_inodes=inodes, avail_inodes=avail_inodes)

        return self._txn(fn, write=False)

    def usage(self) -> Usage:
        return self._txn(lambda tx: Usage(self._counter(tx, "used_space"), self._counter(tx, "used_inodes")),
                         write=False)

    # ================================================================= xattrs
    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name or len(name) > XATTR_NAME_MAX or b"\0" in name:
            raise FsError(errno.ERANGE, "bad xattr name")

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._check_xattr_name(name)

        def fn(tx: Txn) -> bytes:
            value = tx.value("SELECT value FROM xattr WHERE ino = ? AND name = ?", ino, name)
            if value is None:
                self._node(tx, ino)
                raise FsError(errno.ENODATA, f"no xattr {name!r}")
            return _b(value)

        return self._txn(fn, write=False)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG, "xattr value too large")
        if flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags == XATTR_CREATE | XATTR_REPLACE:
            raise FsError(errno.EINVAL, "bad xattr flags")

        def fn(tx: Txn) -> None:
            self._node(tx, ino)
            exists = tx.one("SELECT 1 FROM xattr WHERE ino = ? AND name = ?", ino, name) is not None
            if exists and flags & XATTR_CREATE:
                raise FsError(errno.EEXIST, f"xattr {name!r} exists")
            if not exists and flags & XATTR_REPLACE:
                raise FsError(errno.ENODATA, f"no xattr {name!r}")
            if exists:
                tx.run("UPDATE xattr SET value = ? WHERE ino = ? AND name = ?", bytes(value), ino, name)
            else:
                tx.run("INSERT INTO xattr (ino, name, value) VALUES (?, ?, ?)", ino, name, bytes(value))
            tx.run("UPDATE node SET ctime = ? WHERE ino = ?", _now(), ino)

        self._txn(fn)

    def listxattr(self, ino: int) -> list[bytes]:
        def fn(tx: Txn) -> list[bytes]:
            self._node(tx, ino)
            return [_b(r[0]) for r in tx.all("SELECT name FROM xattr WHERE ino = ? ORDER BY name", ino)]

        return self._txn(fn, write=False)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._check_xattr_name(name)

        def fn(tx: Txn) -> None:
            self._node(tx, ino)
            if not tx.run("DELETE FROM xattr WHERE ino = ? AND name = ?", ino, name):
                raise FsError(errno.ENODATA, f"no xattr {name!r}")
            tx.run("UPDATE node SET ctime = ? WHERE ino = ?", _now(), ino)

        self._txn(fn)

    # =================================================================== data
    def read_chunk(self, ino: int, chunk_idx: int) -> list[Slice]:
        def fn(tx: Txn) -> list[Slice]:
            rows = self._chunk_rows(tx, ino, chunk_idx)
            if not rows:
                self._node(tx, ino)  # ENOENT for a missing inode, [] for a hole
            return rows

        return self._txn(fn, write=False)

    def write(self, ino: int, slices: list[tuple[int, Slice]], min_length: int,
              mtime_ns: int, expect_version: Optional[int] = None,
              expect_rows: Optional[list[Slice]] = None) -> Attr:
        for idx, s in slices:
            if (idx < 0 or s.pos < 0 or s.len <= 0 or s.off < 0 or s.id < 0
                    or (s.id and s.off + s.len > s.size)):
                raise FsError(errno.EINVAL, f"bad slice {s} in chunk {idx}")

        def fn(tx: Txn) -> Attr:
            a = self._node(tx, ino)
            if a.is_dir:
                raise FsError(errno.EISDIR, "write to a directory")
            if not a.is_file:
                raise FsError(errno.EINVAL, "write to a special file")
            if expect_version is not None and a.data_version != expect_version:
                raise FsError(errno.EAGAIN, "the file changed meanwhile")
            if expect_rows is not None:
                [(idx, _)] = slices
                if self._chunk_rows(tx, ino, idx) != list(expect_rows):
                    raise FsError(errno.EAGAIN, "the chunk changed meanwhile")
            fmt = self._fmt(tx)
            for idx, s in slices:
                if s.pos + s.len > fmt.chunk_size:
                    raise FsError(errno.EINVAL, f"slice {s} crosses the end of chunk {idx}")
            length = max(a.length, min_length)
            delta = schema.round_space(length) - schema.round_space(a.length)
            self._check_space(tx, fmt, delta)
            for idx, s in slices:
                self._append_slice(tx, ino, idx, s, fmt.chunk_size)
            self._add_counter(tx, "used_space", delta)
            a.length = length
            if expect_version is None:  # a rewrite of the same bytes changes no attribute
                a.mtime_ns = a.ctime_ns = mtime_ns
                a.data_version += 1
            self._save(tx, a)
            return a

        return self._txn(fn)

    @staticmethod
    def _chunk_rows(tx: Txn, ino: int, idx: int) -> list[Slice]:
        """A chunk's slices in commit order."""
        return [Slice(*r) for r in tx.all("SELECT pos, id, size, off, len FROM chunk"
                                          " WHERE ino = ? AND idx = ? ORDER BY seq", ino, idx)]

    def skip_slice_ids(self, past: int) -> None:
        # the counter holds the next id to hand out
        self._txn(lambda tx: tx.run("UPDATE counter SET value = ? WHERE name = ? AND value <= ?",
                                    past + 1, "next_slice", past))
        with self._slice_lock:
            self._slice_next = self._slice_end = 0  # a batch reserved before may lie below

    def scan_slices(self) -> set[tuple[int, int, int]]:
        rows = self._txn(lambda tx: tx.all("SELECT DISTINCT id, size, ino FROM chunk WHERE id <> 0"),
                         write=False, deadline=None)
        return {(int(i), int(s), int(n)) for i, s, n in rows}

    def pending_deletes(self, limit: int = 1000) -> list[tuple[int, int]]:
        rows = self._txn(lambda tx: tx.all("SELECT id, size FROM delslices ORDER BY id LIMIT ?", limit),
                         write=False)
        return [(int(i), int(s)) for i, s in rows]

    def done_deletes(self, ids: Iterable[int]) -> None:
        ids = [(int(i),) for i in ids]
        if ids:
            self._txn(lambda tx: tx.many("DELETE FROM delslices WHERE id = ?", ids))

    def do_release_sustained(self, ino: int) -> None:
        sid = self.sid

        def fn(tx: Txn) -> None:
            tx.run("DELETE FROM sustained WHERE sid = ? AND ino = ?", sid, ino)
            self._maybe_delete(tx, ino)

        self._txn(fn)
