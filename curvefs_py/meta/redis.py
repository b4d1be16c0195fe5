"""The Redis metadata engine: ``redis://[[user]:password@]host[:port][/db][?options]``.

Same semantics as the SQL engine (sql.py; what is stored and every invariant:
schema.py), over a key layout modelled on JuiceFS's ``pkg/meta/redis.go``.
One volume per Redis database number; nothing else may live in that database.
A single server (with replicas if wanted), not Redis Cluster: scripts compute
key names, and transactions span many keys.

Keys (``{ino}``, ``{idx}``, ``{sid}`` are decimal; names and values are raw bytes):

==================  =========  ===================================================
``setting``         string     the volume's ``Format`` as JSON (``format``)
``schema``          string     ``schema.SCHEMA_VERSION``
``i{ino}``          string     inode: 11 little-endian int64 (``_ATTR``): mode, nlink,
                               uid, gid, rdev, length, atime, mtime, ctime (ns),
                               data_version, parent (as the ``node`` table)
``d{ino}``          hash       directory entries: name -> child ino
``s{ino}``          string     symlink target
``x{ino}``          hash       xattrs: name -> value
``c{ino}_{idx}``    list       the chunk's slices in commit order, 24 bytes each
                               (``_SLICE``: pos u32, id u64, size u32, off u32, len u32)
``C{ino}``          set        chunk indexes that have a ``c`` list (so that truncate and
                               delete find every row without scanning; not in JuiceFS)
``sliceRef``        hash       slice id -> number of chunk rows naming it
``delSlices``       zset       pending deletes: member ``"{id}:{size}"``, score id
``nextinode``       counter    the last inode number handed out (root: 1)
``nextchunk``       counter    the last slice id handed out (0: none yet)
``nextsession``     counter    the last session id handed out
``usedSpace``       counter    as ``used_space`` in schema.py
``totalInodes``     counter    as ``used_inodes`` in schema.py
``sessions``        zset       sid -> heartbeat (µs since the epoch)
``sessionInfos``    hash       sid -> JSON info (host, pid, mountpoint, version)
``sustained{sid}``  set        inodes this session keeps alive (open, nlink 0); sid 0:
                               an engine without a session
``o{ino}``          set        the sids that sustain ``ino`` (reverse of the above)
==================  =========  ===================================================

Transactions.  Every public method is one atomic step.  Most are optimistic
transactions (JuiceFS ``txn``): ``_Tx.read`` pipelines ``WATCH`` of every key it
is about to read with the reads themselves (one round trip per round of
reads), the Python code decides, and ``_Tx.commit`` sends all writes as one
``MULTI ... EXEC``.  If any watched key changed meanwhile, ``EXEC`` does
nothing and the whole function runs again (at most ``MAX_ATTEMPTS`` times,
jittered backoff, counted in ``meta_txn_retries``; then ``MetaError``).  A
read-only transaction of more than one command ends with an empty ``MULTI
EXEC`` that checks its watches, so it saw one snapshot.  Blind updates that
need no decision (``INCRBY usedSpace``, ``HINCRBY sliceRef``) are queued
without watching, so writers of different files never conflict on counters;
a counter is watched only when a limit (capacity, inodes) must be checked.
Slice references are dropped by a small Lua script queued inside the
``MULTI``: it decrements ``sliceRef`` and queues the id in ``delSlices`` when
no chunk row names it any more -- the exact rule of the SQL engine
(``SELECT 1 FROM chunk WHERE id = ?``) without a global index.  Lookups and
readdir are read-only Lua scripts (one round trip, atomic; a directory of
millions of entries keeps the server busy for its whole listing, as JuiceFS's
``HGETALL`` would); new_session is a writing one.  Inode numbers and slice ids are reserved in batches with
``INCRBY`` outside any transaction, so they are never handed out twice, even
after a crash (unused ones are simply skipped).

Within one process, transactions on the same inode (the parent directory for
namespace changes) queue on a striped lock first, so threads of one client do
not make each other retry; only other processes race optimistically.

Concurrency.  Connections come from one redis-py ``ConnectionPool`` (thread
safe); a transaction holds one connection and nothing else shares it.

Durability.  A transaction is committed when ``EXEC`` returns, i.e. in the
server's memory.  For ``fsync`` to mean anything the server must persist every
write: run it with ``appendonly yes`` and ``appendfsync always`` (or
``everysec``, which may lose the last second on a server crash or power loss),
as JuiceFS requires too; RDB snapshots alone lose everything since the last
one.  It must not evict keys (``maxmemory-policy noeviction``).  ``init``
(``curvefs format``) warns when the server is configured otherwise.

URL options: redis-py's (``socket_timeout``, ``socket_connect_timeout``,
``health_check_interval``, ...; ``ssl_*`` for ``rediss://``).  The defaults
here are a 5 s connect and a 30 s read timeout.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import random
import re
import stat
import struct
import threading
import time
import urllib.parse
from typing import Any, Callable, Iterable, Optional, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import ROOT_INODE, metrics
from ..chunk.layout import overlay
from ..errors import FsError, MetaError, QuietError
from ..types import Attr, DirEntry, Format, SetAttr, Slice, StatFs, Usage
from . import schema
from .engine import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE, Engine, IsOpen
from .sql import (DIR_LENGTH, SYMLINK_MAX, UNLIMITED_INODES, UNLIMITED_SPACE, XATTR_NAME_MAX,
                  XATTR_SIZE_MAX, hidden_rows)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts of one transaction before MetaError (WATCH conflicts with other clients).
MAX_ATTEMPTS = 50
#: Attempts when the connection fails before EXEC was sent (after it, the outcome is unknown).
CONN_ATTEMPTS = 3
BACKOFF_START = 0.001
BACKOFF_MAX = 0.1
#: Slice ids and inode numbers reserved per round trip.
SLICE_ID_BATCH = 256
INODE_BATCH = 100
#: Striped per-inode locks shared by every engine of the process.
N_LOCKS = 1024

_ATTR = struct.Struct("<11q")
_SLICE = struct.Struct("<IQIII")
_U32 = 0xFFFF_FFFF

_locks = [threading.Lock() for _ in range(N_LOCKS)]

# ------------------------------------------------------------------ keys
SETTING = b"setting"
SCHEMA = b"schema"
NEXT_INODE = b"nextinode"
NEXT_SLICE = b"nextchunk"
NEXT_SESSION = b"nextsession"
USED_SPACE = b"usedSpace"
TOTAL_INODES = b"totalInodes"
DEL_SLICES = b"delSlices"
SLICE_REF = b"sliceRef"
SESSIONS = b"sessions"
SESSION_INFOS = b"sessionInfos"


def _ikey(ino: int) -> bytes:
    return b"i%d" % ino


def _dkey(ino: int) -> bytes:
    return b"d%d" % ino


def _skey(ino: int) -> bytes:
    return b"s%d" % ino


def _xkey(ino: int) -> bytes:
    return b"x%d" % ino


def _ckey(ino: int, idx: int) -> bytes:
    return b"c%d_%d" % (ino, idx)


_CHUNK_KEY = re.compile(rb"c(\d+)_(\d+)")


def _cset(ino: int) -> bytes:
    return b"C%d" % ino


def _sustained(sid: int) -> bytes:
    return b"sustained%d" % sid


def _holders(ino: int) -> bytes:
    return b"o%d" % ino


# ----------------------------------------------------------------- scripts
class _Script:
    def __init__(self, text: str):
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest()


#: KEYS: i{parent}, d{parent}; ARGV: name -> {} | {parent} | {parent, ino} | {parent, ino, attr}
_LOOKUP = _Script("""
local p = redis.call('GET', KEYS[1])
if not p then return {} end
local e = redis.call('HGET', KEYS[2], ARGV[1])
if not e then return {p} end
local a = redis.call('GET', 'i' .. e)
if not a then return {p, e} end
return {p, e, a}
""")

#: KEYS: i{ino}, d{ino} -> {} | {dir attr, name1, ino1, attr1 or '', ...}
_READDIR = _Script("""
local p = redis.call('GET', KEYS[1])
if not p then return {} end
local out = {p}
local ents = redis.call('HGETALL', KEYS[2])
for i = 1, #ents, 2 do
  out[#out + 1] = ents[i]
  out[#out + 1] = ents[i + 1]
  out[#out + 1] = redis.call('GET', 'i' .. ents[i + 1]) or ''
end
return out
""")

#: KEYS: sliceRef, delSlices; ARGV: (id, size, change of its row count <= 0)*.  Queues
#: ids no row names.  The change is passed as Python wrote it: Lua's -tonumber("0") is
#: -0, which HINCRBY refuses ("value is not an integer"), failing every commit that
#: adds a slice and hides it again.
_UNREF = _Script("""
local n = 0
for i = 1, #ARGV, 3 do
  local left = redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 2])
  if left <= 0 then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i] .. ':' .. ARGV[i + 1])
    n = n + 1
  end
end
return n
""")

#: KEYS: nextsession, sessions, sessionInfos; ARGV: heartbeat, info -> sid
_NEW_SESSION = _Script("""
local sid = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], ARGV[1], sid)
redis.call('HSET', KEYS[3], sid, ARGV[2])
return sid
""")


# ------------------------------------------------------------------ codecs
def _now() -> int:
    return time.time_ns()


def _pack_attr(a: Attr, parent: int) -> bytes:
    return _ATTR.pack(a.mode, a.nlink, a.uid, a.gid, a.rdev, a.length, a.atime_ns, a.mtime_ns,
                      a.ctime_ns, a.data_version, parent)


def _unpack_attr(ino: int, raw: bytes) -> tuple[Attr, int]:
    v = _ATTR.unpack(raw)
    return Attr(ino, *v[:10]), v[10]


def _pack_slice(s: Slice) -> bytes:
    return _SLICE.pack(s.pos, s.id, s.size, s.off, s.len)


def _unpack_slice(raw: bytes) -> Slice:
    pos, sid, size, off, n = _SLICE.unpack(raw)
    return Slice(pos=pos, id=sid, size=size, off=off, len=n)


def _int(v: Any, default: int = 0) -> int:
    return default if v is None else int(v)


def _fmt(raw: Optional[bytes]) -> Format:
    if raw is None:
        raise FsError(errno.ENOENT, "volume not formatted")
    return Format.from_dict(json.loads(raw))


# ------------------------------------------------------------------- URLs
_SSL_OPTIONS = {"ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile",
                "ssl_password", "ssl_check_hostname", "ssl_min_version"}


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def parse_url(url: str) -> str:
    """Check a redis:// or rediss:// URL; return a description without secrets.
    QuietError(exit 3) if it is malformed."""
    shown = redact(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise QuietError(f"bad redis URL {shown!r}: {exc}", 3) from None
    if parts.scheme not in ("redis", "rediss"):
        raise QuietError(f"not a redis:// URL: {shown!r}", 3)
    if not parts.hostname:
        raise QuietError(f"{parts.scheme}:// URL without a host: {shown!r}", 3)
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise QuietError(f"bad redis URL {shown!r}: the path must be a database number", 3)
    known = set(redis.connection.URL_QUERY_ARGUMENT_PARSERS) - {"db", "protocol"}
    if parts.scheme == "rediss":
        known |= _SSL_OPTIONS
    opts = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(opts) - known
    if unknown:
        raise QuietError(f"bad redis URL {shown!r}: unknown option(s) {', '.join(sorted(unknown))}", 3)
    return f"{parts.scheme}://{parts.hostname}:{port or 6379}/{int(path or 0)}"


# ------------------------------------------------------------ transactions
CHANGES_KEY = b"changes"
CHANGES_MAXLEN = 100_000


def _stream_cursor(raw: bytes) -> int:
    ms, _, seq = bytes(raw).partition(b"-")
    return int(ms) * 1_000_000 + int(seq or 0)


def _stream_id(cursor: int) -> bytes:
    ms, seq = divmod(max(cursor, 0), 1_000_000)
    return b"%d-%d" % (ms, seq)


def _roundtrip(conn: Any, cmds: list[tuple]) -> list[Any]:
    """Send ``cmds`` in one packet and read every reply (error replies as values)."""
    conn.send_packed_command(conn.pack_commands(cmds), check_health=False)
    out = []
    for _ in cmds:
        try:
            out.append(conn.read_response(disable_decoding=True))
        except redis.ResponseError as exc:
            out.append(exc)
    return out


def _check(replies: list[Any]) -> list[Any]:
    for r in replies:
        if isinstance(r, redis.ResponseError):
            raise _Broken(str(r))
    return replies


class _Broken(Exception):
    """An unexpected error reply (wrong type, ...): the database is not what we expect."""


class _Conflict(Exception):
    """EXEC found a watched key changed: run the transaction again."""


class _Chunk:
    """One chunk's slice list inside a transaction: as read, and as it is to be."""

    __slots__ = ("orig", "rows")

    def __init__(self, orig: list[Slice]):
        self.orig = orig
        self.rows = list(orig)


class _Tx:
    """One optimistic transaction on one connection (see the module docstring).

    Reads watch their keys first; inode attributes, chunk lists and holder sets
    are cached and changed in place, and written by ``commit`` in one
    ``MULTI``/``EXEC``."""

    def __init__(self, conn: Any, sid: int):
        self.conn = conn
        self.sid = sid
        self.watched: set[bytes] = set()
        self.nreads = 0
        self.writes: list[tuple] = []
        self.nodes: dict[int, Optional[list]] = {}  # ino -> [Attr, parent] | None (missing)
        self.dirty: dict[int, None] = {}
        self.gone: set[int] = set()
        self.chunks: dict[tuple[int, int], _Chunk] = {}
        self.refs: dict[int, list[int]] = {}  # slice id -> [size, rows added, rows dropped]
        self.holder_sets: dict[int, set[int]] = {}
        self.exec_sent = False
        #: the connection still watches keys of an earlier transaction that gave up
        self.stale = getattr(conn, "_curvefs_watching", False)

    # ------------------------------------------------------------ wire
    def _send(self, cmds: list[tuple]) -> list[Any]:
        pre = []
        if self.stale:
            pre = [(b"UNWATCH",)]  # a previous user of the connection gave up half-way
            self.stale = self.conn._curvefs_watching = False
        return _roundtrip(self.conn, pre + cmds)[len(pre):]

    def read(self, cmds: Iterable[tuple], nodes: Iterable[int] = ()) -> list[Any]:
        """Watch the keys of ``cmds`` (and of ``nodes`` not cached yet), run them in
        one round trip and return their replies; the nodes' attributes are cached."""
        node_inos = [i for i in dict.fromkeys(nodes) if i not in self.nodes]
        allc = [(b"GET", _ikey(i)) for i in node_inos] + list(cmds)
        if not allc:
            return []
        keys = [c[1] for c in allc]
        new = [k for k in dict.fromkeys(keys) if k not in self.watched]
        packet = ([(b"WATCH", *new)] if new else []) + allc
        replies = self._send(packet)
        if new:
            self.conn._curvefs_watching = True  # until EXEC or UNWATCH
        replies = _check(replies)[1 if new else 0:]
        self.watched.update(new)
        self.nreads += len(allc)
        for ino, raw in zip(node_inos, replies):
            self.nodes[ino] = None if raw is None else list(_unpack_attr(ino, raw))
        return replies[len(node_inos):]

    def atomic(self, cmds: list[tuple]) -> list[Any]:
        """Run ``cmds`` as one transaction in one round trip (MULTI/EXEC when several),
        without watching anything: for reads of one snapshot and blind writes."""
        if len(cmds) == 1:
            return _check(self._send(cmds))
        replies = self._send([(b"MULTI",)] + cmds + [(b"EXEC",)])
        _check(replies)
        return _check(replies[-1])

    def commit(self) -> None:
        """Send the writes as one MULTI/EXEC; _Conflict if a watched key changed."""
        writes = self._flush()
        if not writes and self.nreads <= 1:
            return  # one command is atomic by itself
        self.exec_sent = bool(writes)
        replies = self._send([(b"MULTI",)] + writes + [(b"EXEC",)])
        self.conn._curvefs_watching = False
        result = replies[-1]
        if isinstance(result, redis.ResponseError):
            errs = [r for r in replies if isinstance(r, redis.ResponseError)]
            raise _Broken(str(errs[0]))
        if result is None:
            raise _Conflict()
        _check(result)

    def _flush(self) -> list[tuple]:
        w = list(self.writes)
        for (ino, idx), ch in self.chunks.items():
            if ch.rows == ch.orig:
                continue
            key = _ckey(ino, idx)
            n = len(ch.orig)
            if ch.rows[:n] == ch.orig:
                w.append((b"RPUSH", key, *[_pack_slice(s) for s in ch.rows[n:]]))
            else:
                w.append((b"DEL", key))
                if ch.rows:
                    w.append((b"RPUSH", key, *[_pack_slice(s) for s in ch.rows]))
            if not ch.rows:
                w.append((b"SREM", _cset(ino), idx))
            elif not ch.orig:
                w.append((b"SADD", _cset(ino), idx))
        for ino in self.dirty:
            if ino not in self.gone:
                a, parent = self.nodes[ino]
                w.append((b"SET", _ikey(ino), _pack_attr(a, parent)))
        unref: list[int] = []
        for sid, (size, added, dropped) in self.refs.items():
            net = added - dropped
            if dropped and net <= 0:
                unref += [sid, size, net]
            elif net > 0:
                w.append((b"HINCRBY", SLICE_REF, sid, net))
        if unref:
            w.append((b"EVAL", _UNREF.text, 2, SLICE_REF, DEL_SLICES, *unref))
        return w

    # ----------------------------------------------------- cached state
    def queue(self, *cmd) -> None:
        self.writes.append(cmd)

    def find(self, ino: int) -> Optional[Attr]:
        """The attributes of ``ino`` or None if it does not exist."""
        if ino not in self.nodes:
            self.read((), nodes=[ino])
        entry = self.nodes[ino]
        return None if entry is None or ino in self.gone else entry[0]

    def node(self, ino: int) -> Attr:
        a = self.find(ino)
        if a is None:
            raise FsError(errno.ENOENT, f"inode {ino} not found")
        return a

    def dir(self, ino: int) -> Attr:
        a = self.node(ino)
        if not a.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return a

    def parent_of(self, ino: int) -> int:
        """A directory's parent (the root for a missing inode, as sql.py)."""
        if self.find(ino) is None:
            return ROOT_INODE
        return self.nodes[ino][1]

    def set_parent(self, ino: int, parent: int) -> None:
        self.node(ino)
        self.nodes[ino][1] = parent
        self.dirty[ino] = None

    def save(self, a: Attr) -> None:
        assert self.nodes.get(a.ino) and self.nodes[a.ino][0] is a
        self.dirty[a.ino] = None

    def add_node(self, a: Attr, parent: int) -> None:
        self.nodes[a.ino] = [a, parent]
        self.dirty[a.ino] = None

    def remove_node(self, ino: int) -> None:
        self.gone.add(ino)
        self.queue(b"DEL", _ikey(ino))

    def touch(self, ino: int, now: int) -> Attr:
        a = self.node(ino)
        a.mtime_ns = a.ctime_ns = now
        self.save(a)
        return a

    def load_chunks(self, ino: int, idxs: Iterable[int]) -> None:
        idxs = [i for i in dict.fromkeys(idxs) if (ino, i) not in self.chunks]
        replies = self.read([(b"LRANGE", _ckey(ino, i), 0, -1) for i in idxs])
        for i, raw in zip(idxs, replies):
            self.chunks[(ino, i)] = _Chunk([_unpack_slice(r) for r in raw])

    def chunk(self, ino: int, idx: int) -> _Chunk:
        self.load_chunks(ino, [idx])
        return self.chunks[(ino, idx)]

    def chunk_indexes(self, ino: int, with_holders: bool = False) -> set[int]:
        """The chunk indexes of ``ino`` that have rows (and, in the same round trip, its
        holders if ``with_holders``)."""
        holders = with_holders and ino not in self.holder_sets
        replies = self.read([(b"SMEMBERS", _cset(ino))] + ([(b"SMEMBERS", _holders(ino))] if holders else []))
        if holders:
            self.holder_sets[ino] = {int(m) for m in replies[1]}
        have = {int(m) for m in replies[0]}
        return have | {i for (n, i), ch in self.chunks.items() if n == ino and ch.rows}

    def ref(self, s: Slice, delta: int) -> None:
        if s.id:
            r = self.refs.setdefault(s.id, [s.size, 0, 0])
            r[1 if delta > 0 else 2] += abs(delta)

    def load_holders(self, inos: Iterable[int]) -> None:
        """Load the holder sets of ``inos`` and their attributes, in one round trip."""
        inos = list(dict.fromkeys(inos))
        nodes = inos
        inos = [i for i in inos if i not in self.holder_sets]
        replies = self.read([(b"SMEMBERS", _holders(i)) for i in inos], nodes=nodes)
        for i, members in zip(inos, replies):
            self.holder_sets[i] = {int(m) for m in members}

    def holders(self, ino: int) -> set[int]:
        self.load_holders([ino])
        return self.holder_sets[ino]


class RedisEngine(Engine):
    """The metadata engine for ``redis://`` and ``rediss://`` URLs (module docstring)."""

    #: keys per SCAN step (``scan_slices``)
    scan_count = 1000

    def __init__(self, url: str):
        super().__init__()
        self.description = parse_url(url)
        try:
            self._pool = redis.ConnectionPool.from_url(
                url, protocol=2, retry=Retry(NoBackoff(), 0), socket_connect_timeout=5,
                socket_timeout=30, socket_keepalive=True)
        except (ValueError, TypeError) as exc:
            raise QuietError(f"bad redis URL {self.description}: {exc}", 3) from None
        self._closed = False
        self._id_lock = threading.Lock()
        self._slice_next = self._slice_end = 0
        self._ino_next = self._ino_end = 0
        self._ino_spare: list[int] = []
        self._session_info: dict = {}

    def __repr__(self) -> str:
        return f"<RedisEngine {self.description}>"

    # ============================================================ plumbing
    def _conn(self) -> Any:
        if self._closed:
            raise MetaError("engine is closed")
        return self._pool.get_connection()

    def _lock(self, ino: Optional[int]) -> contextlib.AbstractContextManager:
        if ino is None:
            return contextlib.nullcontext()
        return _locks[hash((self.description, ino)) % N_LOCKS]

    def _txn(self, fn: Callable[[_Tx], T], lock: Optional[int] = None) -> T:
        """Run ``fn(tx)`` and commit, again from the start after a conflict."""
        with metrics.timer("meta_txn"), self._lock(lock):
            delay = BACKOFF_START
            conn_failures = 0
            for attempt in range(1, MAX_ATTEMPTS + 1):
                tx = None
                conn = None
                try:
                    conn = self._conn()
                    tx = _Tx(conn, self.sid)
                    result = fn(tx)
                    tx.commit()
                    return result
                except _Conflict:
                    log.debug("transaction conflict (attempt %d)", attempt)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    if conn is not None:
                        conn.disconnect()
                    conn_failures += 1
                    # a timeout is a server that stopped answering (30 s): one is enough
                    # (three made a hung server 90 s of silence); a refused or reset
                    # connection (a restart) is tried again at once
                    if ((tx is not None and tx.exec_sent) or conn_failures >= CONN_ATTEMPTS
                            or isinstance(exc, redis.TimeoutError)):
                        metrics.inc("meta_txn_errors")
                        raise MetaError(f"{self.description}: {exc}") from None
                    log.debug("connection failed (attempt %d): %s", attempt, exc)
                    delay = max(delay, 0.05)
                except _Broken as exc:
                    metrics.inc("meta_txn_errors")
                    raise MetaError(f"{self.description}: {exc}") from None
                except redis.RedisError as exc:
                    if conn is not None:
                        conn.disconnect()
                    metrics.inc("meta_txn_errors")
                    raise MetaError(f"{self.description}: {exc}") from None
                finally:
                    if conn is not None:
                        self._pool.release(conn)
                if attempt < MAX_ATTEMPTS:
                    metrics.inc("meta_txn_retries")
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, BACKOFF_MAX)
            metrics.inc("meta_txn_errors")
            raise MetaError(f"{self.description}: transaction failed after {MAX_ATTEMPTS} conflicts")

    def _atomic(self, cmds: list[tuple]) -> list[Any]:
        return self._txn(lambda tx: tx.atomic(cmds))

    def _script(self, script: _Script, keys: list, args: list, write: bool = False) -> Any:
        """Run a Lua script (EVALSHA, loading it on NOSCRIPT) as one transaction.
        ``write``: a lost connection is not retried (the script may have run)."""
        def fn(tx: _Tx) -> Any:
            tx.exec_sent = write
            n = len(keys)
            (r,) = tx._send([(b"EVALSHA", script.sha, n, *keys, *args)])
            if isinstance(r, redis.exceptions.NoScriptError):
                (r,) = tx._send([(b"EVAL", script.text, n, *keys, *args)])
            return _check([r])[0]

        return self._txn(fn)

    # ------------------------------------------------------------ change feed
    def _plain(self, cmds: list[tuple]) -> list[Any]:
        """Commands outside any transaction (the change feed only)."""
        conn = None
        try:
            conn = self._conn()
            return _check(_roundtrip(conn, cmds))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if conn is not None:
                conn.disconnect()
            raise MetaError(f"{self.description}: {exc}") from None
        finally:
            if conn is not None:
                self._pool.release(conn)

    def publish(self, changes: list) -> None:
        """Blocking. Append this session's changes to the ``changes`` stream
        (capped at about CHANGES_MAXLEN entries)."""
        if not changes:
            return
        self._plain([(b"XADD", CHANGES_KEY, b"MAXLEN", b"~", CHANGES_MAXLEN, b"*",
                      b"s", self.sid, b"i", c.ino, b"p", c.parent, b"n", c.name, b"v", c.version)
                     for c in changes])

    def changes_since(self, cursor: int, limit: int = 1000):
        """Blocking. See Engine.changes_since; the cursor encodes a stream id
        ``ms-seq`` as ``ms * 10**6 + seq``."""
        from .engine import Change

        if cursor < 0:
            (last,) = self._plain([(b"XREVRANGE", CHANGES_KEY, b"+", b"-", b"COUNT", 1)])
            return (_stream_cursor(last[0][0]) if last else 0), []
        (rows,) = self._plain([(b"XRANGE", CHANGES_KEY, b"(" + _stream_id(cursor), b"+",
                                b"COUNT", limit)])
        if not rows:
            return cursor, []
        out = []
        for sid_raw, fields in rows:
            f = dict(zip(fields[::2], fields[1::2]))
            sid = _int(f.get(b"s"))
            if sid != self.sid:
                out.append(Change(_stream_cursor(sid_raw), sid, _int(f.get(b"i")),
                                  _int(f.get(b"p")), bytes(f.get(b"n") or b""),
                                  _int(f.get(b"v"), -1)))
        return _stream_cursor(rows[-1][0]), out

    def wait_changes(self, cursor: int, timeout: float) -> None:
        """Blocking. XREAD BLOCK until an entry after ``cursor`` exists or ``timeout``."""
        start = b"$" if cursor < 0 else _stream_id(cursor)
        self._plain([(b"XREAD", b"COUNT", 1, b"BLOCK", max(1, int(timeout * 1000)),
                      b"STREAMS", CHANGES_KEY, start)])

    def _reserve(self, key: bytes, batch: int) -> int:
        """INCRBY ``key`` by ``batch`` (its own atomic step); the new value."""
        return int(self._txn(lambda tx: tx.atomic([(b"INCRBY", key, batch)])[0]))

    def _next_ino(self) -> int:
        with self._id_lock:
            if self._ino_spare:
                return self._ino_spare.pop()
            if self._ino_next >= self._ino_end:
                end = self._reserve(NEXT_INODE, INODE_BATCH)
                self._ino_next, self._ino_end = max(end - INODE_BATCH + 1, ROOT_INODE + 1), end + 1
            ino = self._ino_next
            self._ino_next += 1
            return ino

    # ====================================================== shared steps
    @staticmethod
    def _check_space(tx: _Tx, fmt: Format, delta: int) -> None:
        if delta > 0 and fmt.capacity > 0:
            (used,) = tx.read([(b"GET", USED_SPACE)])
            if _int(used) + delta > fmt.capacity:
                raise FsError(errno.ENOSPC, "volume capacity exceeded")

    @staticmethod
    def _append_slice(tx: _Tx, ino: int, idx: int, s: Slice, chunk_size: int) -> None:
        """Append ``s`` to chunk (ino, idx) and drop the rows it hides (as sql.py)."""
        ch = tx.chunk(ino, idx)
        end = s.pos + s.len
        overlapped = [r for r in ch.rows if r.pos < end and r.pos + r.len > s.pos]
        ch.rows.append(s)
        tx.ref(s, +1)
        if not overlapped:
            return
        lo = min([s.pos] + [r.pos for r in overlapped])
        hi = max([end] + [r.pos + r.len for r in overlapped])
        window = [i for i, r in enumerate(ch.rows) if r.pos < hi and r.pos + r.len > lo]
        hidden = {window[i] for i in hidden_rows([ch.rows[i] for i in window], chunk_size)}
        if not hidden:
            return
        for i in hidden:
            tx.ref(ch.rows[i], -1)
        ch.rows = [r for i, r in enumerate(ch.rows) if i not in hidden]

    @staticmethod
    def _clear_chunks(tx: _Tx, ino: int, idxs: list[int]) -> None:
        tx.load_chunks(ino, idxs)
        for idx in idxs:
            ch = tx.chunks[(ino, idx)]
            for r in ch.rows:
                tx.ref(r, -1)
            ch.rows = []
            if not ch.orig:
                tx.queue(b"SREM", _cset(ino), idx)  # a stale index: keep the set exact

    def _truncate(self, tx: _Tx, a: Attr, length: int, chunk_size: int) -> None:
        """Shrink the slices of ``a`` to ``length`` (< a.length), as sql.py."""
        last, p = divmod(length, chunk_size)
        first_gone = last if p == 0 else last + 1
        gone = sorted(i for i in tx.chunk_indexes(a.ino) if i >= first_gone)
        tx.load_chunks(a.ino, gone + ([last] if p else []))
        self._clear_chunks(tx, a.ino, gone)
        if not p:
            return
        if any(seg.id for seg in overlay(tx.chunk(a.ino, last).rows, p, chunk_size - p)):
            self._append_slice(tx, a.ino, last, Slice(pos=p, id=0, size=0, off=0, len=chunk_size - p),
                               chunk_size)

    def _delete_inode(self, tx: _Tx, a: Attr) -> None:
        """Remove an inode with no links left, queueing its slices."""
        ino = a.ino
        if a.is_file:
            self._clear_chunks(tx, ino, sorted(tx.chunk_indexes(ino, with_holders=True)))
            if a.length:
                tx.queue(b"INCRBY", USED_SPACE, -schema.round_space(a.length))
        elif a.is_symlink:
            tx.queue(b"DEL", _skey(ino))
        elif a.is_dir:
            tx.queue(b"DEL", _dkey(ino))
        for sid in tx.holders(ino):
            tx.queue(b"SREM", _sustained(sid), ino)
        tx.holder_sets[ino] = set()
        tx.queue(b"DEL", _holders(ino), _xkey(ino))
        tx.remove_node(ino)
        tx.queue(b"INCRBY", TOTAL_INODES, -1)

    def _drop_link(self, tx: _Tx, a: Attr, is_open: IsOpen, now: int) -> Attr:
        """One entry of non-directory ``a`` is gone (its HDEL already queued)."""
        a.nlink -= 1
        a.ctime_ns = now
        if a.nlink > 0:
            tx.save(a)
        elif is_open(a.ino):
            tx.save(a)
            tx.holders(a.ino).add(tx.sid)
            tx.queue(b"SADD", _sustained(tx.sid), a.ino)
            tx.queue(b"SADD", _holders(a.ino), tx.sid)
            self.sustained(a.ino)
        else:
            self._delete_inode(tx, a)
        return a

    def _maybe_delete(self, tx: _Tx, ino: int) -> None:
        """Remove ``ino`` if it has no links and nobody sustains it."""
        a = tx.find(ino)
        if a is not None and a.nlink == 0 and not tx.holders(ino):
            self._delete_inode(tx, a)

    def _release(self, tx: _Tx, sid: int, ino: int) -> None:
        holders = tx.holders(ino)
        if sid in holders:
            holders.discard(sid)
            tx.queue(b"SREM", _sustained(sid), ino)
            tx.queue(b"SREM", _holders(ino), sid)
        self._maybe_delete(tx, ino)

    def _is_ancestor(self, tx: _Tx, anc: int, ino: int) -> bool:
        """Is directory ``anc`` equal to ``ino`` or on its path to the root?"""
        seen = set()
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INODE or ino in seen:
                return False
            seen.add(ino)
            ino = tx.parent_of(ino)

    # ============================================================ lifecycle
    def init(self, fmt: Format, force: bool = False) -> None:
        if fmt.chunk_size <= 0 or fmt.block_size <= 0:
            raise FsError(errno.EINVAL, "chunk_size and block_size must be positive")
        if fmt.chunk_size > _U32:
            raise FsError(errno.EINVAL, "chunk_size must be below 4 GiB")

        def fn(tx: _Tx) -> None:
            raw, root = tx.read([(b"GET", SETTING), (b"EXISTS", _ikey(ROOT_INODE))])
            if raw is not None:
                if not force:
                    raise FsError(errno.EEXIST, "a volume exists (use force to overwrite its settings)")
                old = _fmt(raw)
                if (old.chunk_size, old.block_size) != (fmt.chunk_size, fmt.block_size):
                    raise FsError(errno.EINVAL, "chunk_size and block_size of a volume cannot change")
            tx.queue(b"SET", SETTING, json.dumps(fmt.to_dict()))
            tx.queue(b"SET", SCHEMA, schema.SCHEMA_VERSION)
            tx.queue(b"SETNX", NEXT_INODE, ROOT_INODE)
            if not root:
                now = _now()
                a = Attr(ino=ROOT_INODE, mode=stat.S_IFDIR | 0o777, nlink=2, length=DIR_LENGTH,
                         atime_ns=now, mtime_ns=now, ctime_ns=now)
                tx.add_node(a, ROOT_INODE)
                tx.queue(b"INCRBY", TOTAL_INODES, 1)

        self._txn(fn)
        self._check_server()

    def _check_server(self) -> None:
        """Warn when the server may lose committed transactions (module docstring)."""
        try:
            conf = {}
            for name in ("appendonly", "appendfsync", "maxmemory-policy"):
                reply = self._atomic([(b"CONFIG", b"GET", name)])[0]
                conf.update({reply[i].decode(): reply[i + 1].decode() for i in range(0, len(reply), 2)})
        except MetaError:
            return  # CONFIG is often disabled on managed servers: nothing to check
        if conf.get("appendonly", "yes") != "yes" or conf.get("appendfsync", "always") == "no":
            log.warning("%s does not fsync its append-only file (appendonly %s, appendfsync %s): "
                        "a server crash can lose committed metadata; use appendonly yes, "
                        "appendfsync always or everysec", self.description,
                        conf.get("appendonly"), conf.get("appendfsync"))
        if conf.get("maxmemory-policy", "noeviction") != "noeviction":
            log.warning("%s evicts keys (maxmemory-policy %s): metadata can be lost; "
                        "use noeviction", self.description, conf["maxmemory-policy"])

    def load(self) -> Format:
        return _fmt(self._atomic([(b"GET", SETTING)])[0])

    def close(self) -> None:
        self._closed = True
        self._pool.disconnect()

    # ============================================================= sessions
    def new_session(self, info: dict) -> int:
        self.sid = int(self._script(_NEW_SESSION, [NEXT_SESSION, SESSIONS, SESSION_INFOS],
                                    [_now() // 1000, json.dumps(info)], write=True))
        self._session_info = dict(info)
        return self.sid

    def heartbeat(self) -> None:
        sid = self.sid
        if not sid:
            return
        score, _, _ = self._atomic([(b"ZSCORE", SESSIONS, sid), (b"ZADD", SESSIONS, _now() // 1000, sid),
                                      (b"HSETNX", SESSION_INFOS, sid, json.dumps(self._session_info))])
        if score is None:
            log.warning("session %d had been closed as stale by another client; registered again", sid)

    def close_session(self) -> None:
        sid = self.sid
        self._txn(lambda tx: self._close_session(tx, sid))
        self.sid = 0

    def _close_session(self, tx: _Tx, sid: int) -> None:
        (members,) = tx.read([(b"SMEMBERS", _sustained(sid))])
        inos = sorted(int(m) for m in members)
        tx.load_holders(inos)
        for ino in inos:
            self._release(tx, sid, ino)
        tx.queue(b"DEL", _sustained(sid))
        tx.queue(b"ZREM", SESSIONS, sid)
        tx.queue(b"HDEL", SESSION_INFOS, sid)

    def clean_stale_sessions(self, max_age_s: float) -> list[int]:
        """Blocking. As the interface says; never closes this engine's own session."""
        def fn(tx: _Tx) -> list[int]:
            cutoff = (_now() - int(max_age_s * 1e9)) // 1000
            (members,) = tx.read([(b"ZRANGEBYSCORE", SESSIONS, b"-inf", b"(%d" % cutoff)])
            sids = sorted(s for s in (int(m) for m in members) if s != self.sid)
            for sid in sids:
                self._close_session(tx, sid)
            return sids

        return self._txn(fn)

    def list_sessions(self) -> list[dict]:
        flat, infos = self._atomic([(b"ZRANGE", SESSIONS, 0, -1, b"WITHSCORES"), (b"HGETALL", SESSION_INFOS)])
        info = {int(infos[i]): infos[i + 1] for i in range(0, len(infos), 2)}
        out = []
        for i in range(0, len(flat), 2):
            sid = int(flat[i])
            out.append({**json.loads(info.get(sid, b"{}")), "sid": sid,
                        "heartbeat": float(flat[i + 1]) / 1e6})
        return sorted(out, key=lambda s: s["sid"])

    # ================================================================== ids
    def next_slice_id(self) -> int:
        with self._id_lock:
            if self._slice_next >= self._slice_end:
                end = self._reserve(NEXT_SLICE, SLICE_ID_BATCH)
                self._slice_next, self._slice_end = end - SLICE_ID_BATCH + 1, end + 1
            sid = self._slice_next
            self._slice_next += 1
            return sid

    # ============================================================ namespace
    def do_lookup(self, parent: int, name: bytes) -> Attr:
        if name in (b".", b".."):
            def fn(tx: _Tx) -> Attr:
                tx.dir(parent)
                return tx.node(parent if name == b"." else tx.parent_of(parent))

            return self._txn(fn)
        r = self._script(_LOOKUP, [_ikey(parent), _dkey(parent)], [name])
        if not r:
            raise FsError(errno.ENOENT, f"inode {parent} not found")
        if not stat.S_ISDIR(_ATTR.unpack(r[0])[0]):
            raise FsError(errno.ENOTDIR, f"inode {parent} is not a directory")
        if len(r) < 3:
            raise FsError(errno.ENOENT, f"{name!r} not found")
        return _unpack_attr(int(r[1]), r[2])[0]

    def do_getattr(self, ino: int) -> Attr:
        (raw,) = self._atomic([(b"GET", _ikey(ino))])
        if raw is None:
            raise FsError(errno.ENOENT, f"inode {ino} not found")
        return _unpack_attr(ino, raw)[0]

    def do_setattr(self, ino: int, changes: SetAttr) -> Attr:
        def fn(tx: _Tx) -> Attr:
            a = tx.node(ino)
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
                    (raw,) = tx.read([(b"GET", SETTING)])
                    fmt = _fmt(raw)
                    delta = schema.round_space(changes.length) - schema.round_space(a.length)
                    self._check_space(tx, fmt, delta)
                    if changes.length < a.length:
                        self._truncate(tx, a, changes.length, fmt.chunk_size)
                    if delta:
                        tx.queue(b"INCRBY", USED_SPACE, delta)
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
                tx.save(a)
            return a

        return self._txn(fn, lock=ino)

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
        ino = self._next_ino()

        def fn(tx: _Tx) -> Attr:
            exists, raw = tx.read([(b"HEXISTS", _dkey(parent), name), (b"GET", SETTING)], nodes=[parent])
            p = tx.dir(parent)
            if exists:
                raise FsError(errno.EEXIST, f"{name!r} exists")
            fmt = _fmt(raw)
            if fmt.inodes > 0:
                (used,) = tx.read([(b"GET", TOTAL_INODES)])
                if _int(used) >= fmt.inodes:
                    raise FsError(errno.ENOSPC, "inode limit reached")
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
            tx.add_node(a, parent if is_dir else 0)
            tx.queue(b"HSET", _dkey(parent), name, ino)
            if typ == stat.S_IFLNK:
                tx.queue(b"SET", _skey(ino), target)
            p.nlink += 1 if is_dir else 0
            tx.touch(parent, now)
            tx.queue(b"INCRBY", TOTAL_INODES, 1)
            return a

        try:
            return self._txn(fn, lock=parent)
        except MetaError:
            raise  # (EXEC may have been applied: never hand the number out again)
        except FsError:
            with self._id_lock:
                self._ino_spare.append(ino)  # refused, nothing committed: use it next time
            raise

    def do_unlink(self, parent: int, name: bytes, is_open: IsOpen) -> Attr:
        def fn(tx: _Tx) -> Attr:
            (entry,) = tx.read([(b"HGET", _dkey(parent), name)], nodes=[parent])
            tx.dir(parent)
            if entry is None:
                raise FsError(errno.ENOENT, f"{name!r} not found")
            a = tx.node(int(entry))
            if a.is_dir:
                raise FsError(errno.EISDIR, f"{name!r} is a directory")
            now = _now()
            tx.queue(b"HDEL", _dkey(parent), name)
            tx.touch(parent, now)
            return self._drop_link(tx, a, is_open, now)

        return self._txn(fn, lock=parent)

    def do_rmdir(self, parent: int, name: bytes) -> int:
        def fn(tx: _Tx) -> int:
            (entry,) = tx.read([(b"HGET", _dkey(parent), name)], nodes=[parent])
            tx.dir(parent)
            if entry is None:
                raise FsError(errno.ENOENT, f"{name!r} not found")
            ino = int(entry)
            (n,) = tx.read([(b"HLEN", _dkey(ino))], nodes=[ino])
            a = tx.node(ino)
            if not a.is_dir:
                raise FsError(errno.ENOTDIR, f"{name!r} is not a directory")
            if n:
                raise FsError(errno.ENOTEMPTY, f"{name!r} is not empty")
            now = _now()
            tx.queue(b"HDEL", _dkey(parent), name)
            self._delete_inode(tx, a)
            tx.node(parent).nlink -= 1
            tx.touch(parent, now)
            return ino

        return self._txn(fn, lock=parent)

    def do_rename(self, parent: int, name: bytes, newparent: int, newname: bytes,
                  flags: int, is_open: IsOpen) -> tuple[int, Optional[Attr]]:
        exchange = bool(flags & RENAME_EXCHANGE)

        def fn(tx: _Tx) -> tuple[int, Optional[Attr]]:
            # the order of checks follows Linux do_renameat2 / vfs_rename (as sql.py)
            src_e, dst_e = tx.read([(b"HGET", _dkey(parent), name), (b"HGET", _dkey(newparent), newname)],
                                   nodes=[parent, newparent])
            tx.dir(parent)
            tx.dir(newparent)
            if src_e is None:
                raise FsError(errno.ENOENT, f"{name!r} not found")
            ino = int(src_e)
            dino = None if dst_e is None else int(dst_e)
            if flags & RENAME_NOREPLACE and dino is not None:
                raise FsError(errno.EEXIST, f"{newname!r} exists")
            if exchange and dino is None:
                raise FsError(errno.ENOENT, f"{newname!r} not found")
            tx.read((), nodes=[ino] + ([dino] if dino is not None else []))
            src = tx.node(ino)
            dst = tx.node(dino) if dino is not None else None
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
                tx.queue(b"HSET", _dkey(parent), name, dst.ino)
                tx.queue(b"HSET", _dkey(newparent), newname, ino)
                if parent != newparent:
                    if src.is_dir:
                        tx.set_parent(ino, newparent)
                    if dst.is_dir:
                        tx.set_parent(dst.ino, parent)
                    shift = int(src.is_dir) - int(dst.is_dir)  # subdirectories moving to newparent
                    tx.node(parent).nlink -= shift
                    tx.node(newparent).nlink += shift
                for a in (src, dst):
                    a.ctime_ns = now
                    tx.save(a)
                tx.touch(parent, now)
                tx.touch(newparent, now)
                return ino, None

            replaced: Optional[Attr] = None
            if dst is not None:
                if src.is_dir and not dst.is_dir:
                    raise FsError(errno.ENOTDIR, f"{newname!r} is not a directory")
                if not src.is_dir and dst.is_dir:
                    raise FsError(errno.EISDIR, f"{newname!r} is a directory")
                if dst.is_dir:
                    (n,) = tx.read([(b"HLEN", _dkey(dst.ino))])
                    if n:
                        raise FsError(errno.ENOTEMPTY, f"{newname!r} is not empty")
                    self._delete_inode(tx, dst)
                    tx.node(newparent).nlink -= 1
                    tx.save(tx.node(newparent))
                    dst.nlink, dst.ctime_ns = 0, now
                    replaced = dst
                else:
                    replaced = self._drop_link(tx, dst, is_open, now)
            tx.queue(b"HDEL", _dkey(parent), name)
            tx.queue(b"HSET", _dkey(newparent), newname, ino)
            if src.is_dir and parent != newparent:
                tx.set_parent(ino, newparent)
                tx.node(parent).nlink -= 1
                tx.node(newparent).nlink += 1
            src.ctime_ns = now
            tx.save(src)
            tx.touch(parent, now)
            if newparent != parent:
                tx.touch(newparent, now)
            return ino, replaced

        return self._txn(fn, lock=parent)

    def do_link(self, ino: int, newparent: int, newname: bytes) -> Attr:
        def fn(tx: _Tx) -> Attr:
            (exists,) = tx.read([(b"HEXISTS", _dkey(newparent), newname)], nodes=[ino, newparent])
            a = tx.node(ino)
            if a.is_dir:
                raise FsError(errno.EPERM, "hard link to a directory")
            if a.nlink == 0:
                raise FsError(errno.ENOENT, "inode was unlinked")
            tx.dir(newparent)
            if exists:
                raise FsError(errno.EEXIST, f"{newname!r} exists")
            now = _now()
            tx.queue(b"HSET", _dkey(newparent), newname, ino)
            a.nlink += 1
            a.ctime_ns = now
            tx.save(a)
            tx.touch(newparent, now)
            return a

        return self._txn(fn, lock=newparent)

    def readlink(self, ino: int) -> bytes:
        raw, target = self._atomic([(b"GET", _ikey(ino)), (b"GET", _skey(ino))])
        if raw is None:
            raise FsError(errno.ENOENT, f"inode {ino} not found")
        if not stat.S_ISLNK(_ATTR.unpack(raw)[0]):
            raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
        if target is None:
            raise MetaError(f"symlink {ino} has no target")
        return target

    def readdir(self, ino: int) -> list[DirEntry]:
        r = self._script(_READDIR, [_ikey(ino), _dkey(ino)], [])
        if not r:
            raise FsError(errno.ENOENT, f"inode {ino} not found")
        if not stat.S_ISDIR(_ATTR.unpack(r[0])[0]):
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        out = []
        for i in range(1, len(r), 3):
            if r[i + 2]:  # (an entry without its inode would be damage: fsck's business)
                child = int(r[i + 1])
                a = _unpack_attr(child, r[i + 2])[0]
                out.append(DirEntry(r[i], child, a))
        out.sort(key=lambda d: d.name)
        return out

    def statfs(self) -> StatFs:
        raw, used, inodes = self._atomic([(b"GET", SETTING), (b"GET", USED_SPACE), (b"GET", TOTAL_INODES)])
        fmt = _fmt(raw)
        used, inodes = _int(used), _int(inodes)
        total = fmt.capacity if fmt.capacity > 0 else UNLIMITED_SPACE
        avail_inodes = max(0, fmt.inodes - inodes) if fmt.inodes > 0 else UNLIMITED_INODES
        return StatFs(total_space=total, avail_space=max(0, total - used),
                      used_inodes=inodes, avail_inodes=avail_inodes)

    def usage(self) -> Usage:
        used, inodes = self._atomic([(b"GET", USED_SPACE), (b"GET", TOTAL_INODES)])
        return Usage(_int(used), _int(inodes))

    # =============================================================== xattrs
    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name or len(name) > XATTR_NAME_MAX or b"\0" in name:
            raise FsError(errno.ERANGE, "bad xattr name")

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._check_xattr_name(name)
        value, exists = self._atomic([(b"HGET", _xkey(ino), name), (b"EXISTS", _ikey(ino))])
        if not exists:
            raise FsError(errno.ENOENT, f"inode {ino} not found")
        if value is None:
            raise FsError(errno.ENODATA, f"no xattr {name!r}")
        return value

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG, "xattr value too large")
        if flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags == XATTR_CREATE | XATTR_REPLACE:
            raise FsError(errno.EINVAL, "bad xattr flags")

        def fn(tx: _Tx) -> None:
            (exists,) = tx.read([(b"HEXISTS", _xkey(ino), name)], nodes=[ino])
            a = tx.node(ino)
            if exists and flags & XATTR_CREATE:
                raise FsError(errno.EEXIST, f"xattr {name!r} exists")
            if not exists and flags & XATTR_REPLACE:
                raise FsError(errno.ENODATA, f"no xattr {name!r}")
            tx.queue(b"HSET", _xkey(ino), name, bytes(value))
            a.ctime_ns = _now()
            tx.save(a)

        self._txn(fn, lock=ino)

    def listxattr(self, ino: int) -> list[bytes]:
        exists, names = self._atomic([(b"EXISTS", _ikey(ino)), (b"HKEYS", _xkey(ino))])
        if not exists:
            raise FsError(errno.ENOENT, f"inode {ino} not found")
        return sorted(names)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._check_xattr_name(name)

        def fn(tx: _Tx) -> None:
            (exists,) = tx.read([(b"HEXISTS", _xkey(ino), name)], nodes=[ino])
            a = tx.node(ino)
            if not exists:
                raise FsError(errno.ENODATA, f"no xattr {name!r}")
            tx.queue(b"HDEL", _xkey(ino), name)
            a.ctime_ns = _now()
            tx.save(a)

        self._txn(fn, lock=ino)

    # ================================================================= data
    def read_chunk(self, ino: int, chunk_idx: int) -> list[Slice]:
        rows, exists = self._atomic([(b"LRANGE", _ckey(ino, chunk_idx), 0, -1), (b"EXISTS", _ikey(ino))])
        if not rows and not exists:
            raise FsError(errno.ENOENT, f"inode {ino} not found")
        return [_unpack_slice(r) for r in rows]

    def write(self, ino: int, slices: list[tuple[int, Slice]], min_length: int,
              mtime_ns: int, expect_version: Optional[int] = None,
              expect_rows: Optional[list[Slice]] = None) -> Attr:
        for idx, s in slices:
            if (idx < 0 or s.pos < 0 or s.len <= 0 or s.off < 0 or s.id < 0
                    or (s.id and s.off + s.len > s.size) or s.size > _U32 or s.pos + s.len > _U32):
                raise FsError(errno.EINVAL, f"bad slice {s} in chunk {idx}")
        idxs = list(dict.fromkeys(idx for idx, _ in slices))

        def fn(tx: _Tx) -> Attr:
            raw, *rows = tx.read([(b"GET", SETTING)] + [(b"LRANGE", _ckey(ino, i), 0, -1) for i in idxs],
                                 nodes=[ino])
            a = tx.node(ino)
            if a.is_dir:
                raise FsError(errno.EISDIR, "write to a directory")
            if not a.is_file:
                raise FsError(errno.EINVAL, "write to a special file")
            if expect_version is not None and a.data_version != expect_version:
                raise FsError(errno.EAGAIN, "the file changed meanwhile")
            fmt = _fmt(raw)
            for idx, s in slices:
                if s.pos + s.len > fmt.chunk_size:
                    raise FsError(errno.EINVAL, f"slice {s} crosses the end of chunk {idx}")
            for i, raw_rows in zip(idxs, rows):
                tx.chunks[(ino, i)] = _Chunk([_unpack_slice(r) for r in raw_rows])
            if expect_rows is not None:
                [idx] = idxs
                if tx.chunks[(ino, idx)].orig != list(expect_rows):
                    raise FsError(errno.EAGAIN, "the chunk changed meanwhile")
            length = max(a.length, min_length)
            delta = schema.round_space(length) - schema.round_space(a.length)
            self._check_space(tx, fmt, delta)
            for idx, s in slices:
                self._append_slice(tx, ino, idx, s, fmt.chunk_size)
            if delta:
                tx.queue(b"INCRBY", USED_SPACE, delta)
            a.length = length
            if expect_version is None:  # a rewrite of the same bytes changes no attribute
                a.mtime_ns = a.ctime_ns = mtime_ns
                a.data_version += 1
            tx.save(a)
            return a

        return self._txn(fn, lock=ino)

    def skip_slice_ids(self, past: int) -> None:
        def fn(tx: _Tx) -> None:  # the counter holds the last id handed out
            (cur,) = tx.read([(b"GET", NEXT_SLICE)])
            if int(cur or 0) < past:
                tx.queue(b"SET", NEXT_SLICE, past)

        self._txn(fn)
        with self._id_lock:
            self._slice_next = self._slice_end = 0  # a batch reserved before may lie below

    def scan_slices(self) -> set[tuple[int, int, int]]:
        """SCAN the ``c{ino}_{idx}`` lists page by page (not one snapshot)."""
        out: set[tuple[int, int, int]] = set()
        cursor = b"0"
        while True:
            ((cursor, keys),) = self._plain([(b"SCAN", cursor, b"MATCH", b"c[0-9]*_[0-9]*",
                                              b"COUNT", self.scan_count)])
            inos = {k: int(m.group(1)) for k in keys if (m := _CHUNK_KEY.fullmatch(k))}
            lists = self._plain([(b"LRANGE", k, 0, -1) for k in inos]) if inos else []
            for ino, rows in zip(inos.values(), lists):
                for r in rows:
                    sl = _unpack_slice(r)
                    if sl.id:
                        out.add((sl.id, sl.size, ino))
            if int(cursor) == 0:
                return out

    def pending_deletes(self, limit: int = 1000) -> list[tuple[int, int]]:
        if limit <= 0:
            return []
        (members,) = self._atomic([(b"ZRANGE", DEL_SLICES, 0, limit - 1)])
        out = []
        for m in members:
            sid, _, size = m.partition(b":")
            out.append((int(sid), int(size)))
        return out

    def done_deletes(self, ids: Iterable[int]) -> None:
        cmds = [(b"ZREMRANGEBYSCORE", DEL_SLICES, int(i), int(i)) for i in ids]
        if cmds:
            self._atomic(cmds)

    def do_release_sustained(self, ino: int) -> None:
        sid = self.sid
        self._txn(lambda tx: self._release(tx, sid, ino), lock=ino)
