"""The PostgreSQL metadata engine: the SQL engine (sql.py) over psycopg 3.

URL: ``postgres://USER:PASSWORD@HOST:PORT/DBNAME[?PARAM=VALUE&...]`` (scheme
``postgresql`` too).  The URL is a libpq connection URI: user and password are
percent-decoded, and query parameters (``sslmode``, ``sslrootcert``,
``connect_timeout``, ``application_name``, ``host=/unix/socket/dir``, ...) are
passed to libpq as they are; an unknown one is refused when the engine is
created (QuietError, exit 3).  The database name is required.

The database.  ``init`` (``curvefs format``) creates the database when it does
not exist and the user may (``CREATEDB``), through the ``postgres`` (else
``template1``) maintenance database; every other method treats a missing
database as a volume that is not formatted (``FsError(ENOENT)``).  Tables live
in the user's current schema (``search_path``).

Transactions.  Each engine call is one transaction on a pooled connection:
writes run ``SERIALIZABLE``, so PostgreSQL itself guarantees that concurrent
transactions of any number of clients have the effect of some serial order, as
SQLite's single writer does (a check-then-act such as "is the target an
ancestor?" cannot be invalidated by another client's commit); reads run
``REPEATABLE READ READ ONLY``: one snapshot of committed transactions, never
aborted, never blocking a writer (SERIALIZABLE reads would add predicate locks
to every lookup to rule out only PostgreSQL's rare read-only anomaly).  A serialization failure (SQLSTATE 40001) or a deadlock (40P01) rolls
the transaction back and runs it again (``sql.SqlEngine._txn``: bounded,
jittered backoff, counted in ``meta_txn_retries``).  The write transactions of
one engine (one client) take turns on a mutex, as SQLite's do: the counters in
schema.py are rows that nearly every write updates, so two writers of one
client would only abort each other (and a deadlock costs PostgreSQL's
``deadlock_timeout``, 1 s by default); the database arbitrates between clients.

Connections.  The pool of sql.py gives each transaction its own connection, so
any number of worker threads may call the engine; there are as many
connections as calls ever ran at once (the daemon's ``META`` limiter bounds
that).  ``BEGIN`` travels with a transaction's first statement (one round
trip less; ``PgConnection``).  A connection lost before ``COMMIT`` (server
restart, idle timeout, network) is dropped and the transaction runs again on a
new one: the server rolled it back.  A connection lost during ``COMMIT`` is not
retried (it may have committed) and becomes ``MetaError``.  Statements are not
prepared server-side: psycopg forgets prepared statements at every rollback,
and a lookup that misses ends in one.

Errors.  An unreachable server, a failed authentication or a missing database
without the right to create it are ``MetaError``/``FsError`` with a one-line
message naming the server (never the password).
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import socket
import threading
import time
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import sql as pg_sql

from ..errors import FsError, MetaError, QuietError
from .sql import Dialect, SqlEngine

log = logging.getLogger(__name__)

#: SQLSTATEs that mean "run the transaction again": serialization_failure, deadlock_detected.
RETRY_SQLSTATES = frozenset({"40001", "40P01"})
#: Seconds to wait for a connection when the URL does not say (libpq waits forever).
CONNECT_TIMEOUT = 10
#: How often the deadline watchdog looks (seconds): deadlines are this coarse.
WATCHDOG_TICK_S = 0.5

_MISSING_DB = re.compile(r'database "(.*)" does not exist')


class StaleConnection(Exception):
    """A pooled connection failed at BEGIN: nothing was sent, run the transaction again."""


def parse_url(url: str) -> dict[str, str]:
    """The libpq parameters of a postgres:// URL; QuietError(3) if it is not one."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql"):
        raise QuietError(f"not a postgres:// URL: {redact(url)!r}", 3)
    try:
        params = pg_conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise QuietError(f"{redact(url)!r}: {one_line(exc)}", 3) from None
    if not params.get("dbname"):
        raise QuietError(f"{redact(url)!r}: a postgres URL needs a database name "
                         "(postgres://user:password@host:port/dbname)", 3)
    return {k: str(v) for k, v in params.items()}


def redact(url: str) -> str:
    """``url`` without the password."""
    return re.sub(r"^([a-z]+://[^:/@?]*):[^@/?]*@", r"\1:***@", url)


def one_line(exc: BaseException) -> str:
    """A driver message on one line, without libpq's 'connection failed:' noise."""
    text = str(exc).strip()
    if text.startswith("connection failed: "):
        text = text[len("connection failed: "):]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return re.sub(r"\s+", " ", "; ".join(lines).replace("FATAL: ", "")) or type(exc).__name__


class PostgresDialect(Dialect):
    types = {"BLOB": "BYTEA"}
    placeholder = "%s"
    add_column = "ADD COLUMN IF NOT EXISTS"  # two clients may both find it missing

    def __init__(self, params: dict[str, str]):
        params = dict(params)
        params.setdefault("connect_timeout", str(CONNECT_TIMEOUT))
        self.params = params
        self.dbname = params["dbname"]
        self.user = params.get("user", "")
        host, port = params.get("host", ""), params.get("port", "")
        where = f"{host}:{port}" if port else host or "localhost"
        self.description = f"postgres://{self.user + '@' if self.user else ''}{where}/{self.dbname}"
        self._lock = threading.Lock()  # one writer per engine (see the module docstring)

    # ------------------------------------------------------------ connections
    def _connect(self, **override: str) -> Any:
        return psycopg.connect(pg_conninfo.make_conninfo("", **{**self.params, **override}),
                               autocommit=True, prepare_threshold=None)

    def connect(self, create: bool) -> Any:
        try:
            return PgConnection(self._connect())
        except psycopg.OperationalError as exc:
            if not _MISSING_DB.search(str(exc)):
                raise MetaError(f"{self.description}: {one_line(exc)}") from None
            if not create:
                raise FsError(errno.ENOENT, f"{self.description}: database {self.dbname!r} does not exist "
                                            "(volume not formatted)") from None
        self._create_database()
        try:
            return PgConnection(self._connect())
        except psycopg.OperationalError as exc:
            raise MetaError(f"{self.description}: {one_line(exc)}") from None

    def _create_database(self) -> None:
        """CREATE DATABASE through a maintenance database (FsError if we may not)."""
        last: BaseException | None = None
        for maint in ("postgres", "template1"):
            try:
                conn = self._connect(dbname=maint)
            except psycopg.OperationalError as exc:
                last = exc
                continue
            try:
                conn.execute(pg_sql.SQL("CREATE DATABASE {}").format(pg_sql.Identifier(self.dbname)))
                return
            except psycopg.errors.DuplicateDatabase:
                return  # created meanwhile by another client
            except psycopg.errors.InsufficientPrivilege:
                raise FsError(errno.EACCES, f"{self.description}: database {self.dbname!r} does not exist "
                                            f"and user {self.user!r} may not create it "
                                            "(create it, or grant CREATEDB)") from None
            except psycopg.Error as exc:
                raise MetaError(f"{self.description}: cannot create database {self.dbname!r}: "
                                f"{one_line(exc)}") from None
            finally:
                conn.close()
        raise MetaError(f"{self.description}: database {self.dbname!r} does not exist and no maintenance "
                        f"database to create it from: {one_line(last) if last else ''}")

    def usable(self, conn: Any) -> bool:
        return not (conn.raw.closed or conn.raw.broken or conn.cut)

    @contextlib.contextmanager
    def deadline(self, conn: Any, seconds: float | None):
        """libpq has no read timeout: a server that stops answering (SIGSTOP, a hung
        host behind a live TCP peer) held a FUSE request, and the process in D state,
        for the whole outage.  Past ``seconds`` the watchdog shuts the connection's
        socket down; the blocked call fails and the caller gets EIO."""
        if seconds is None:
            yield
            return
        token = _WATCHDOG.arm(conn, seconds)
        try:
            yield
        except Exception as exc:
            if conn.cut:  # not retried: every pooled connection would wait as long
                raise MetaError(f"{self.description}: no answer within {seconds:g} s") from exc
            raise
        finally:
            _WATCHDOG.disarm(token)

    # ----------------------------------------------------------- transactions
    def begin(self, conn: Any, write: bool) -> None:
        conn.begin("BEGIN ISOLATION LEVEL SERIALIZABLE" if write
                   else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def is_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, StaleConnection):
            return True
        return isinstance(exc, psycopg.Error) and exc.sqlstate in RETRY_SQLSTATES

    def is_db_error(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.Error)

    def table_exists(self, cur: Any, name: str) -> bool:
        cur.execute("SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema()"
                    " AND tablename = %s", (name,))
        return cur.fetchone() is not None

    def column_exists(self, cur: Any, table: str, column: str) -> bool:
        cur.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
                    " AND table_name = %s AND column_name = %s", (table, column))
        return cur.fetchone() is not None

    def write_lock(self) -> contextlib.AbstractContextManager:
        return self._lock


class PostgresEngine(SqlEngine):
    """The PostgreSQL engine for ``postgres://`` URLs (see the module docstring)."""

    def __init__(self, url: str):
        super().__init__(PostgresDialect(parse_url(url)))


class _Watchdog:
    """One thread that cuts the connections of transactions past their deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, "PgConnection"]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, conn: "PgConnection", seconds: float) -> int:
        with self._lock:
            token = next(self._ids)
            self._armed[token] = (time.monotonic() + seconds, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pg-deadline", daemon=True)
                self._thread.start()
        return token

    def disarm(self, token: int) -> None:
        with self._lock:
            self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(WATCHDOG_TICK_S)
            now = time.monotonic()
            with self._lock:
                due = [(t, c) for t, (d, c) in self._armed.items() if d <= now]
                for t, c in due:
                    del self._armed[t]
                    c.cut = True  # never back into the pool, even if it finished just now
            for _, c in due:
                c.shut_down()


_WATCHDOG = _Watchdog()


class PgConnection:
    """A psycopg connection (autocommit; the engine issues BEGIN) whose ``BEGIN`` is
    sent with the transaction's first statement, in one round trip, and whose lost
    connections before ``COMMIT`` become ``StaleConnection`` (the server rolls an
    open transaction back when its connection goes, so running it again is safe)."""

    __slots__ = ("raw", "pending", "cut")

    def __init__(self, raw: psycopg.Connection):
        self.raw = raw
        self.pending: str | None = None  # a BEGIN not sent yet
        self.cut = False  # shut down by the deadline watchdog

    def shut_down(self) -> None:
        """Shut the socket down under a blocked libpq call (it then fails at once)."""
        try:
            s = socket.socket(fileno=os.dup(self.raw.fileno()))
        except (OSError, psycopg.Error):
            return
        try:
            s.shutdown(socket.SHUT_RDWR)
            log.warning("postgres: a transaction passed its deadline: connection cut")
        except OSError:
            pass
        finally:
            s.close()

    def begin(self, stmt: str) -> None:
        self.pending = stmt

    def cursor(self) -> "PgCursor":
        return PgCursor(self)

    def commit(self) -> None:
        if self.pending is not None:  # no statement ran: nothing to commit
            self.pending = None
            return
        self.raw.commit()  # a failure here is ambiguous (committed or not): not retried

    def rollback(self) -> None:
        self.pending = None
        self.raw.rollback()

    def close(self) -> None:
        self.raw.close()

    def lost(self, exc: BaseException) -> BaseException:
        """``exc`` as StaleConnection if the connection is gone, else unchanged."""
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and (
                self.raw.broken or self.raw.closed):
            self.pending = None
            return StaleConnection(one_line(exc))
        return exc


class PgCursor:
    """The DB-API subset sql.Txn uses, over PgConnection (see there)."""

    __slots__ = ("conn", "cur")

    def __init__(self, conn: PgConnection):
        self.conn = conn
        self.cur: psycopg.Cursor = conn.raw.cursor()

    def execute(self, query: str, params=()) -> None:
        try:
            begin = self.conn.pending
            if begin is None:
                self.cur.execute(query, params)
                return
            self.conn.pending = None
            # BEGIN and the statement in one simple-protocol message (client-side binding)
            cur = psycopg.ClientCursor(self.conn.raw)
            cur.execute(f"{begin}; {query}", params)
            cur.nextset()
            self.cur.close()
            self.cur = cur
        except Exception as exc:
            lost = self.conn.lost(exc)
            if lost is exc:
                raise
            raise lost from exc

    def executemany(self, query: str, rows) -> None:
        try:
            if self.conn.pending is not None:
                begin, self.conn.pending = self.conn.pending, None
                self.conn.raw.execute(begin)
            self.cur.executemany(query, rows)
        except Exception as exc:
            lost = self.conn.lost(exc)
            if lost is exc:
                raise
            raise lost from exc

    @property
    def rowcount(self) -> int:
        return self.cur.rowcount

    def fetchone(self):
        return self.cur.fetchone()

    def fetchall(self):
        return self.cur.fetchall()

    def close(self) -> None:
        self.cur.close()
