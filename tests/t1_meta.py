"""Conformance suite of the metadata ``Engine`` interface (meta/engine.py).

Every test runs against every engine in ``ENGINE_FACTORIES``: a name mapped to
``factory(tmp_path, request) -> META_URL`` of a fresh, empty database (a
factory may use ``request.getfixturevalue`` to start a server).  A new engine
(redis, postgres) joins the suite by adding one entry; engine-specific tests
(URL parsing, busy retries) are at the end and say which engine they need.

Only the public interface is used, except where a test says otherwise.  Data
is checked the way the read path sees it: ``read_chunk`` + ``layout.overlay``
over a fake object store (slice id -> bytes kept by the test).
"""
from __future__ import annotations

import array
import errno
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

import servers

from curvefs_py import ROOT_INODE, metrics
from curvefs_py.chunk.layout import chunk_ranges, overlay
from curvefs_py.errors import FsError, MetaError, QuietError
from curvefs_py.meta import open_engine
from curvefs_py.meta.engine import (RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE,
                                    Change, Engine)
from curvefs_py.types import Format, SetAttr, Slice

REPO = Path(__file__).resolve().parent.parent

#: name -> factory(tmp_path, request) -> URL of a fresh database
ENGINE_FACTORIES: dict[str, Callable[[Path, pytest.FixtureRequest], str]] = {
    "sqlite": lambda tmp_path, request: f"sqlite3://{tmp_path}/meta.db",
    "postgres": lambda tmp_path, request: request.getfixturevalue("pg").new_database(),
    "redis": lambda tmp_path, request: servers.redis_new_db(request.getfixturevalue("redis_server")),
}

CS = 64 << 10  # chunk size of the test volume (small, so tests cross chunks cheaply)
BS = 16 << 10
NEVER = lambda ino: False  # noqa: E731  (is_open: nothing is open)
ALWAYS = lambda ino: True  # noqa: E731
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def make_format(**kw) -> Format:
    args = dict(name="t1", uuid="00000000-0000-0000-0000-000000000001", storage="file",
                bucket="/nonexistent", block_size=BS, chunk_size=CS)
    args.update(kw)
    return Format(**args)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(params=sorted(ENGINE_FACTORIES))
def meta_url(request, tmp_path) -> str:
    return ENGINE_FACTORIES[request.param](tmp_path, request)


@pytest.fixture
def engines(meta_url, caplog):
    """``engines()`` opens another client of the same volume (``init=True``
    formats it first); all are closed at teardown, and a WARNING or ERROR
    logged by the engines fails the test."""
    opened: list[Engine] = []
    caplog.set_level(logging.WARNING, logger="curvefs_py")

    def open_(init: bool = False, session: bool = True, **fmt) -> Engine:
        e = open_engine(meta_url)
        opened.append(e)
        if init:
            e.init(make_format(**fmt))
        if session:
            e.new_session({"host": "test", "pid": os.getpid(), "mountpoint": "/t", "version": "t"})
        return e

    yield open_
    for e in opened:
        try:
            if e.sid:
                e.close_session()
        finally:
            e.close()
    bad = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("curvefs_py")]
    assert not bad, [r.getMessage() for r in bad]


@pytest.fixture
def engine(engines) -> Engine:
    return engines(init=True)


# ------------------------------------------------------------------- helpers
class raises_errno:
    """``with raises_errno(errno.ENOENT): ...`` expects FsError with that errno."""

    def __init__(self, code: int):
        self.code = code

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        assert typ is not None, f"expected {errno.errorcode[self.code]}, nothing raised"
        if not issubclass(typ, FsError):
            return False
        assert exc.errno == self.code, f"expected {errno.errorcode[self.code]}, got " \
                                       f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc})"
        return True


def mkfile(e: Engine, parent: int, name: bytes, mode: int = FILE, **kw) -> int:
    return e.mknod(parent, name, mode, kw.get("uid", 1000), kw.get("gid", 1000)).ino


def mkdir(e: Engine, parent: int, name: bytes, mode: int = DIR, **kw) -> int:
    return e.mknod(parent, name, mode, kw.get("uid", 1000), kw.get("gid", 1000)).ino


def age(e: Engine, ino: int, t: int = 1000) -> None:
    """Set every time of ``ino`` to ``t`` so that a later change is visible."""
    e.setattr(ino, SetAttr(atime_ns=t, mtime_ns=t, ctime_ns=t))


def touched(e: Engine, ino: int, t: int = 1000) -> bool:
    a = e.getattr(ino)
    return a.mtime_ns > t and a.ctime_ns > t


class Store:
    """A fake object store: the bytes of every slice the test commits."""

    def __init__(self, e: Engine, seed: int = 0):
        self.e = e
        self.objects: dict[int, bytes] = {}
        self.rng = random.Random(seed)

    def slices_for(self, off: int, data: bytes, padded: bool = False) -> list[tuple[int, Slice]]:
        """Slices for ``data`` at file offset ``off`` (one new slice id per chunk piece);
        ``padded``: the object holds extra bytes around the shown ones (off > 0)."""
        out, done = [], 0
        for idx, coff, n in chunk_ranges(off, len(data), CS):
            piece = data[done:done + n]
            done += n
            pre = self.rng.randbytes(self.rng.randrange(1, 50)) if padded else b""
            post = self.rng.randbytes(self.rng.randrange(1, 50)) if padded else b""
            sid = self.e.next_slice_id()
            self.objects[sid] = pre + piece + post
            out.append((idx, Slice(pos=coff, id=sid, size=len(pre + piece + post), off=len(pre), len=n)))
        return out

    def write(self, ino: int, off: int, data: bytes, padded: bool = False):
        return self.e.write(ino, self.slices_for(off, data, padded), off + len(data), time.time_ns())

    def read(self, ino: int, off: int = 0, n: int | None = None) -> bytes:
        if n is None:
            n = self.e.getattr(ino).length - off
        buf = bytearray()
        for idx, coff, cn in chunk_ranges(off, n, CS):
            for seg in overlay(self.e.read_chunk(ino, idx), coff, cn):
                if seg.id == 0:
                    buf += bytes(seg.len)
                else:
                    obj = self.objects[seg.id]
                    assert len(obj) == seg.size
                    buf += obj[seg.off:seg.off + seg.len]
        return bytes(buf)


def hidden_rows(rows: list[Slice]) -> list[int]:
    """Brute force: indices of the rows of a chunk that show at no byte."""
    owner = array.array("i", [-1]) * CS
    for i, s in enumerate(rows):
        owner[s.pos:s.pos + s.len] = array.array("i", [i]) * s.len
    shown = set(owner)
    return [i for i in range(len(rows)) if i not in shown]


def pending(e: Engine) -> dict[int, int]:
    return dict(e.pending_deletes(1 << 30))


def check_tree(e: Engine) -> dict[int, int]:
    """Walk the namespace from the root and check its invariants: every directory
    is reached once, ``..`` is its parent, nlink = 2 + subdirectories, readdir
    is sorted and agrees with getattr; non-directories' nlink = their entries.
    Returns {ino: number of entries}."""
    links: Counter = Counter()
    seen_dirs = {ROOT_INODE}
    stack = [(ROOT_INODE, ROOT_INODE)]
    while stack:
        ino, parent = stack.pop()
        attr = e.getattr(ino)
        assert attr.is_dir
        assert e.lookup(ino, b"..").ino == parent
        assert e.lookup(ino, b".").ino == ino
        entries = e.readdir(ino)
        assert [d.name for d in entries] == sorted(d.name for d in entries)
        subdirs = 0
        for d in entries:
            assert d.attr == e.getattr(d.ino)
            assert e.lookup(ino, d.name).ino == d.ino
            links[d.ino] += 1
            if d.attr.is_dir:
                assert d.ino not in seen_dirs, "directory reachable twice (loop or double entry)"
                seen_dirs.add(d.ino)
                subdirs += 1
                stack.append((d.ino, ino))
        assert attr.nlink == 2 + subdirs, (ino, attr.nlink, subdirs)
    for ino, n in links.items():
        a = e.getattr(ino)
        if not a.is_dir:
            assert a.nlink == n, (ino, a.nlink, n)
    assert e.usage().used_inodes == len(links) + 1  # the root counts
    return dict(links)


# ============================================================== lifecycle
def test_load_unformatted(engines):
    e = engines(session=False)
    with raises_errno(errno.ENOENT):
        e.load()


def test_init_load_and_root(engines):
    e = engines(session=False)
    fmt = make_format(capacity=1 << 30)
    e.init(fmt)
    assert e.load() == fmt
    root = e.getattr(ROOT_INODE)
    assert root.mode == stat.S_IFDIR | 0o777 and root.nlink == 2
    assert (root.uid, root.gid, root.length) == (0, 0, 4096)
    assert e.lookup(ROOT_INODE, b"..").ino == ROOT_INODE
    assert e.lookup(ROOT_INODE, b".").ino == ROOT_INODE
    assert e.readdir(ROOT_INODE) == []
    assert e.usage().used_inodes == 1 and e.usage().used_space == 0  # the root


def test_init_exists_and_force(engines):
    e = engines(init=True)
    ino = mkfile(e, ROOT_INODE, b"keep")
    with raises_errno(errno.EEXIST):
        e.init(make_format(name="again"))
    new = make_format(name="renamed", capacity=5 << 30, inodes=100)
    e.init(new, force=True)
    assert e.load() == new
    assert e.lookup(ROOT_INODE, b"keep").ino == ino  # data kept
    assert e.usage().used_inodes == 2
    with raises_errno(errno.EINVAL):  # the data layout cannot change under existing slices
        e.init(make_format(chunk_size=CS * 2), force=True)
    other = engines(session=False)  # another client sees the new settings
    assert other.load() == new


def test_closed_engine_refuses(engines):
    e = engines(init=True, session=False)
    e.close()
    with pytest.raises(MetaError):
        e.getattr(ROOT_INODE)


# =============================================================== namespace
def test_mknod_types(engine):
    e = engine
    before = e.getattr(ROOT_INODE)
    f = e.mknod(ROOT_INODE, b"file", FILE, 1000, 100)
    assert (f.mode, f.nlink, f.uid, f.gid, f.length, f.rdev) == (FILE, 1, 1000, 100, 0, 0)
    assert f.atime_ns == f.mtime_ns == f.ctime_ns > 0
    assert f.ino not in (0, ROOT_INODE)
    d = e.mknod(ROOT_INODE, b"dir", DIR, 0, 0)
    assert d.nlink == 2 and d.length == 4096 and d.is_dir
    s = e.mknod(ROOT_INODE, b"link", stat.S_IFLNK | 0o777, 0, 0, target=b"../some/where")
    assert s.is_symlink and s.length == len(b"../some/where")
    assert e.readlink(s.ino) == b"../some/where"
    fifo = e.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o600, 0, 0)
    sock = e.mknod(ROOT_INODE, b"sock", stat.S_IFSOCK | 0o600, 0, 0)
    chr_ = e.mknod(ROOT_INODE, b"chr", stat.S_IFCHR | 0o600, 0, 0, rdev=os.makedev(1, 3))
    blk = e.mknod(ROOT_INODE, b"blk", stat.S_IFBLK | 0o600, 0, 0, rdev=os.makedev(8, 1))
    assert stat.S_ISFIFO(fifo.mode) and stat.S_ISSOCK(sock.mode)
    assert chr_.rdev == os.makedev(1, 3) and blk.rdev == os.makedev(8, 1)
    plain = e.mknod(ROOT_INODE, b"plain", 0o640, 0, 0)  # no type bits: a regular file
    assert plain.mode == stat.S_IFREG | 0o640
    inos = [a.ino for a in (f, d, s, fifo, sock, chr_, blk, plain)]
    assert len(set(inos)) == len(inos)
    root = e.getattr(ROOT_INODE)
    assert root.nlink == before.nlink + 1  # one subdirectory
    assert e.usage().used_inodes == len(inos) + 1
    for a in (f, d, s, fifo, sock, chr_, blk, plain):
        assert e.getattr(a.ino) == a
    check_tree(e)


def test_errors_raised_with_a_message_keep_their_errno():
    """``MetaError("text")`` is EIO with that text; an errno given explicitly wins.
    (The errno goes to the kernel as is: it must be an int.)"""
    e = MetaError("redis://h:1/0: connection refused")
    assert e.errno == errno.EIO and str(e) == "redis://h:1/0: connection refused"
    assert FsError(errno.ENOENT, "gone").errno == errno.ENOENT
    assert MetaError(errno.EAGAIN).errno == errno.EAGAIN and str(MetaError()) == "EIO"


def test_mknod_errors(engine):
    e = engine
    f = mkfile(e, ROOT_INODE, b"f")
    with raises_errno(errno.EEXIST):
        mkfile(e, ROOT_INODE, b"f")
    with raises_errno(errno.EEXIST):
        mkdir(e, ROOT_INODE, b"f")
    with raises_errno(errno.ENOENT):
        mkfile(e, 999999, b"x")
    with raises_errno(errno.ENOTDIR):
        mkfile(e, f, b"x")
    for bad in (b"", b"a/b", b"a\0b"):
        with raises_errno(errno.EINVAL):
            mkfile(e, ROOT_INODE, bad)
    with raises_errno(errno.ENAMETOOLONG):
        mkfile(e, ROOT_INODE, b"x" * 256)
    mkfile(e, ROOT_INODE, b"y" * 255)
    for dot in (b".", b".."):
        with raises_errno(errno.EEXIST):
            mkfile(e, ROOT_INODE, dot)
    with raises_errno(errno.EINVAL):  # symlink without a target
        e.mknod(ROOT_INODE, b"s", stat.S_IFLNK | 0o777, 0, 0)
    with raises_errno(errno.EINVAL):  # not a file type
        e.mknod(ROOT_INODE, b"t", 0o170000 | 0o644, 0, 0)
    with raises_errno(errno.EINVAL):
        e.readlink(f)
    with raises_errno(errno.ENOENT):
        e.readlink(999999)
    assert e.usage().used_inodes == 3  # failed creations left nothing behind
    check_tree(e)


def test_mknod_updates_parent_times(engine):
    e = engine
    d = mkdir(e, ROOT_INODE, b"d")
    age(e, d)
    mkfile(e, d, b"f")
    assert touched(e, d)
    age(e, d)
    mkdir(e, d, b"sub")
    assert touched(e, d) and e.getattr(d).nlink == 3


def test_setgid_directory_inheritance(engine):
    e = engine
    d = e.mknod(ROOT_INODE, b"shared", stat.S_IFDIR | stat.S_ISGID | 0o775, 1000, 500)
    f = e.mknod(d.ino, b"f", FILE, 1001, 1001)
    assert f.gid == 500 and not f.mode & stat.S_ISGID
    sub = e.mknod(d.ino, b"sub", DIR, 1001, 1001)
    assert sub.gid == 500 and sub.mode & stat.S_ISGID
    subsub = e.mknod(sub.ino, b"x", FILE, 1001, 1001)
    assert subsub.gid == 500
    plain = e.mknod(ROOT_INODE, b"plain", DIR, 1001, 1001)
    assert plain.gid == 1001 and not plain.mode & stat.S_ISGID


def test_lookup(engine):
    e = engine
    d = mkdir(e, ROOT_INODE, b"d")
    sub = mkdir(e, d, b"sub")
    f = mkfile(e, sub, b"f")
    assert e.lookup(ROOT_INODE, b"d").ino == d
    assert e.lookup(d, b"sub").ino == sub
    assert e.lookup(sub, b"..").ino == d
    assert e.lookup(d, b"..").ino == ROOT_INODE
    assert e.lookup(sub, b".").ino == sub
    assert e.lookup(sub, b"f") == e.getattr(f)
    with raises_errno(errno.ENOENT):
        e.lookup(d, b"missing")
    with raises_errno(errno.ENOTDIR):
        e.lookup(f, b"x")
    with raises_errno(errno.ENOTDIR):
        e.lookup(f, b"..")
    with raises_errno(errno.ENOENT):
        e.lookup(999999, b"x")
    with raises_errno(errno.ENAMETOOLONG):
        e.lookup(d, b"n" * 256)
    with raises_errno(errno.EINVAL):
        e.lookup(d, b"a/b")
    with raises_errno(errno.ENOENT):
        e.getattr(999999)


def test_setattr(engine):
    e = engine
    f = e.getattr(mkfile(e, ROOT_INODE, b"f"))
    age(e, f.ino)
    a = e.setattr(f.ino, SetAttr(mode=0o4711))
    assert a.mode == stat.S_IFREG | 0o4711 and a.ctime_ns > 1000 and a.mtime_ns == 1000
    a = e.setattr(f.ino, SetAttr(mode=stat.S_IFDIR | 0o600))  # type bits are ignored
    assert a.mode == stat.S_IFREG | 0o600
    a = e.setattr(f.ino, SetAttr(uid=7, gid=8))
    assert (a.uid, a.gid) == (7, 8)
    a = e.setattr(f.ino, SetAttr(atime_ns=123, mtime_ns=456))
    assert (a.atime_ns, a.mtime_ns) == (123, 456) and a.ctime_ns > 1000
    t0 = time.time_ns()
    a = e.setattr(f.ino, SetAttr(atime_ns=SetAttr.NOW, mtime_ns=SetAttr.NOW))
    assert a.atime_ns >= t0 and a.mtime_ns >= t0 and a.ctime_ns >= t0
    a = e.setattr(f.ino, SetAttr(ctime_ns=77))
    assert a.ctime_ns == 77
    assert e.setattr(f.ino, SetAttr()) == a  # nothing to change: nothing changes
    assert e.getattr(f.ino) == a
    assert a.data_version == f.data_version
    with raises_errno(errno.ENOENT):
        e.setattr(999999, SetAttr(mode=0o644))
    d = mkdir(e, ROOT_INODE, b"d")
    with raises_errno(errno.EISDIR):
        e.setattr(d, SetAttr(length=0))
    fifo = e.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o644, 0, 0).ino
    with raises_errno(errno.EINVAL):
        e.setattr(fifo, SetAttr(length=10))
    with raises_errno(errno.EINVAL):
        e.setattr(f.ino, SetAttr(length=-1))
    dm = e.setattr(d, SetAttr(mode=0o700))
    assert dm.mode == stat.S_IFDIR | 0o700


def test_truncate_attrs_and_space(engine):
    e = engine
    f = e.getattr(mkfile(e, ROOT_INODE, b"f"))
    age(e, f.ino)
    a = e.setattr(f.ino, SetAttr(length=5000))
    assert a.length == 5000 and a.data_version == f.data_version + 1
    assert a.mtime_ns > 1000 and a.ctime_ns > 1000
    assert e.usage().used_space == 8192  # rounded up to 4 KiB
    a2 = e.setattr(f.ino, SetAttr(length=5000))  # same length: times only
    assert a2.data_version == a.data_version
    a3 = e.setattr(f.ino, SetAttr(length=100))
    assert a3.length == 100 and a3.data_version == a.data_version + 1
    assert e.usage().used_space == 4096
    e.setattr(f.ino, SetAttr(length=0))
    assert e.usage().used_space == 0


def test_unlink(engine):
    e = engine
    st = Store(e)
    d = mkdir(e, ROOT_INODE, b"d")
    f = mkfile(e, d, b"f")
    st.write(f, 0, b"x" * 10000)
    ids = {s.id for s in e.read_chunk(f, 0)}
    e.link(f, ROOT_INODE, b"hard")
    age(e, d)
    age(e, f)
    a = e.unlink(d, b"f", NEVER)
    assert a.ino == f and a.nlink == 1 and a.ctime_ns > 1000
    assert touched(e, d)
    assert e.getattr(f).nlink == 1 and pending(e) == {}
    with raises_errno(errno.ENOENT):
        e.unlink(d, b"f", NEVER)
    used = e.usage()
    a = e.unlink(ROOT_INODE, b"hard", NEVER)
    assert a.nlink == 0
    with raises_errno(errno.ENOENT):
        e.getattr(f)
    assert set(pending(e)) == ids
    assert e.usage().used_inodes == used.used_inodes - 1
    assert e.usage().used_space == used.used_space - 12288
    with raises_errno(errno.EISDIR):
        e.unlink(ROOT_INODE, b"d", NEVER)
    with raises_errno(errno.EINVAL):
        e.unlink(d, b".", NEVER)
    with raises_errno(errno.ENOTEMPTY):
        e.unlink(d, b"..", NEVER)
    with raises_errno(errno.ENOENT):
        e.unlink(999999, b"x", NEVER)
    sym = e.mknod(d, b"sym", stat.S_IFLNK | 0o777, 0, 0, target=b"t").ino
    e.setxattr(sym, b"user.a", b"1")
    e.unlink(d, b"sym", NEVER)
    with raises_errno(errno.ENOENT):
        e.readlink(sym)
    check_tree(e)


def test_unlink_while_open(engine):
    e = engine
    st = Store(e)
    f = mkfile(e, ROOT_INODE, b"f")
    st.write(f, 0, b"data" * 1000)
    opened = {f}
    a = e.unlink(ROOT_INODE, b"f", lambda ino: ino in opened)
    assert a.nlink == 0
    with raises_errno(errno.ENOENT):
        e.lookup(ROOT_INODE, b"f")
    # the open file still works: attributes, reads, writes, xattrs
    assert e.getattr(f).nlink == 0
    assert st.read(f) == b"data" * 1000
    st.write(f, 4000, b"more")
    assert st.read(f) == b"data" * 1000 + b"more"
    assert pending(e) == {}
    assert e.usage().used_inodes == 2  # still counted until released
    with raises_errno(errno.ENOENT):  # no new links to an unlinked inode
        e.link(f, ROOT_INODE, b"back")
    ids = {s.id for s in e.read_chunk(f, 0)}
    e.release_sustained(f)
    with raises_errno(errno.ENOENT):
        e.getattr(f)
    assert set(pending(e)) == ids
    assert e.usage() == type(e.usage())(0, 1)  # the root
    e.release_sustained(f)  # releasing twice is harmless
    g = mkfile(e, ROOT_INODE, b"g")
    txns = metrics.get("meta_txn_count")
    e.release_sustained(g)  # releasing a linked inode changes nothing: no transaction
    assert metrics.get("meta_txn_count") == txns
    assert e.getattr(g).nlink == 1


def test_rmdir(engine):
    e = engine
    d = mkdir(e, ROOT_INODE, b"d")
    sub = mkdir(e, d, b"sub")
    f = mkfile(e, sub, b"f")
    e.setxattr(sub, b"user.x", b"y")
    with raises_errno(errno.ENOTEMPTY):
        e.rmdir(d, b"sub")
    with raises_errno(errno.ENOTDIR):
        e.rmdir(sub, b"f")
    with raises_errno(errno.ENOENT):
        e.rmdir(d, b"missing")
    with raises_errno(errno.EINVAL):
        e.rmdir(d, b".")
    with raises_errno(errno.ENOTEMPTY):
        e.rmdir(d, b"..")
    with raises_errno(errno.ENOTDIR):
        e.rmdir(f, b"x")
    e.unlink(sub, b"f", NEVER)
    age(e, d)
    assert e.getattr(d).nlink == 3
    assert e.rmdir(d, b"sub") == sub
    assert e.getattr(d).nlink == 2 and touched(e, d)
    with raises_errno(errno.ENOENT):
        e.getattr(sub)
    with raises_errno(errno.ENOENT):
        e.readdir(sub)
    with raises_errno(errno.ENOENT):
        mkfile(e, sub, b"late")
    assert e.rmdir(ROOT_INODE, b"d") == d
    assert e.getattr(ROOT_INODE).nlink == 2
    assert e.usage().used_inodes == 1
    check_tree(e)


def test_link(engine):
    e = engine
    d = mkdir(e, ROOT_INODE, b"d")
    f = mkfile(e, ROOT_INODE, b"f")
    age(e, f)
    age(e, d)
    a = e.link(f, d, b"g")
    assert a.ino == f and a.nlink == 2 and a.ctime_ns > 1000 and a.mtime_ns == 1000
    assert touched(e, d)
    assert e.lookup(d, b"g").ino == f
    with raises_errno(errno.EEXIST):
        e.link(f, d, b"g")
    with raises_errno(errno.EPERM):
        e.link(d, ROOT_INODE, b"dirlink")
    with raises_errno(errno.ENOENT):
        e.link(999999, ROOT_INODE, b"x")
    with raises_errno(errno.ENOTDIR):
        e.link(f, f, b"x")
    with raises_errno(errno.ENOENT):
        e.link(f, 999999, b"x")
    with raises_errno(errno.EEXIST):
        e.link(f, d, b"..")
    assert e.usage().used_inodes == 3
    check_tree(e)


def test_readdir(engine):
    e = engine
    d = mkdir(e, ROOT_INODE, b"d")
    assert e.readdir(d) == []
    names = [b"b", b"a", b"\xff\xfe", b"A", b"a.b", b"zz", b"0"]
    inos = {n: mkfile(e, d, n) for n in names}
    sub = mkdir(e, d, b"m")
    inos[b"m"] = sub
    ents = e.readdir(d)
    assert [x.name for x in ents] == sorted(inos)
    for x in ents:
        assert x.ino == inos[x.name] and x.attr == e.getattr(x.ino)
    f = inos[b"a"]
    with raises_errno(errno.ENOTDIR):
        e.readdir(f)
    with raises_errno(errno.ENOENT):
        e.readdir(999999)


def test_xattr(engine):
    e = engine
    f = mkfile(e, ROOT_INODE, b"f")
    with raises_errno(errno.ENODATA):
        e.getxattr(f, b"user.a")
    assert e.listxattr(f) == []
    age(e, f)
    e.setxattr(f, b"user.b", b"2")
    assert e.getattr(f).ctime_ns > 1000
    e.setxattr(f, b"user.a", b"\x00\xff")
    e.setxattr(f, b"user.empty", b"")
    assert e.getxattr(f, b"user.a") == b"\x00\xff"
    assert e.getxattr(f, b"user.empty") == b""
    assert e.listxattr(f) == [b"user.a", b"user.b", b"user.empty"]
    with raises_errno(errno.EEXIST):
        e.setxattr(f, b"user.a", b"x", XATTR_CREATE)
    with raises_errno(errno.ENODATA):
        e.setxattr(f, b"user.c", b"x", XATTR_REPLACE)
    e.setxattr(f, b"user.a", b"new", XATTR_REPLACE)
    e.setxattr(f, b"user.c", b"x", XATTR_CREATE)
    e.setxattr(f, b"user.c", b"y")  # no flag: create or replace
    assert e.getxattr(f, b"user.a") == b"new" and e.getxattr(f, b"user.c") == b"y"
    with raises_errno(errno.EINVAL):
        e.setxattr(f, b"user.d", b"x", XATTR_CREATE | XATTR_REPLACE)
    with raises_errno(errno.E2BIG):
        e.setxattr(f, b"user.big", b"x" * 65537)
    e.setxattr(f, b"user.max", b"x" * 65536)
    with raises_errno(errno.ERANGE):
        e.setxattr(f, b"u" * 256, b"x")
    age(e, f)
    e.removexattr(f, b"user.b")
    assert e.getattr(f).ctime_ns > 1000
    with raises_errno(errno.ENODATA):
        e.removexattr(f, b"user.b")
    assert e.listxattr(f) == [b"user.a", b"user.c", b"user.empty", b"user.max"]
    for call in (lambda: e.getxattr(999999, b"user.a"), lambda: e.setxattr(999999, b"user.a", b"x"),
                 lambda: e.listxattr(999999), lambda: e.removexattr(999999, b"user.a")):
        with raises_errno(errno.ENOENT):
            call()
    d = mkdir(e, ROOT_INODE, b"d")
    e.setxattr(d, b"user.dir", b"1")
    assert e.listxattr(d) == [b"user.dir"]
    e.setxattr(ROOT_INODE, b"user.root", b"r")
    assert e.getxattr(ROOT_INODE, b"user.root") == b"r"
    # xattrs go with their inode and do not come back with a reused name
    e.unlink(ROOT_INODE, b"f", NEVER)
    f2 = mkfile(e, ROOT_INODE, b"f")
    assert e.listxattr(f2) == []


# ================================================================== rename
def test_rename_file(engine):
    e = engine
    a = mkdir(e, ROOT_INODE, b"a")
    b = mkdir(e, ROOT_INODE, b"b")
    f = mkfile(e, a, b"f")
    for ino in (a, b, f):
        age(e, ino)
    assert e.rename(a, b"f", a, b"g", 0, NEVER) == (f, None)
    assert e.lookup(a, b"g").ino == f and touched(e, a) and e.getattr(f).ctime_ns > 1000
    with raises_errno(errno.ENOENT):
        e.lookup(a, b"f")
    for ino in (a, b, f):
        age(e, ino)
    assert e.rename(a, b"g", b, b"h", 0, NEVER) == (f, None)
    assert touched(e, a) and touched(e, b)
    assert e.getattr(f).ctime_ns > 1000 and e.getattr(f).mtime_ns == 1000
    assert e.getattr(a).nlink == 2 and e.getattr(b).nlink == 2
    assert [x.name for x in e.readdir(a)] == [] and [x.name for x in e.readdir(b)] == [b"h"]
    check_tree(e)


def test_rename_errors(engine):
    e = engine
    a = mkdir(e, ROOT_INODE, b"a")
    f = mkfile(e, a, b"f")
    with raises_errno(errno.ENOENT):
        e.rename(a, b"missing", a, b"x", 0, NEVER)
    with raises_errno(errno.ENOENT):
        e.rename(999999, b"f", a, b"x", 0, NEVER)
    with raises_errno(errno.ENOENT):
        e.rename(a, b"f", 999999, b"x", 0, NEVER)
    with raises_errno(errno.ENOTDIR):
        e.rename(a, b"f", f, b"x", 0, NEVER)
    with raises_errno(errno.ENOTDIR):
        e.rename(f, b"f", a, b"x", 0, NEVER)
    with raises_errno(errno.EINVAL):
        e.rename(a, b".", ROOT_INODE, b"x", 0, NEVER)
    with raises_errno(errno.EINVAL):
        e.rename(a, b"..", ROOT_INODE, b"x", 0, NEVER)
    with raises_errno(errno.EEXIST):
        e.rename(a, b"f", a, b".", 0, NEVER)
    with raises_errno(errno.EINVAL):
        e.rename(a, b"f", a, b"x", 4, NEVER)
    with raises_errno(errno.EINVAL):
        e.rename(a, b"f", a, b"x", RENAME_NOREPLACE | RENAME_EXCHANGE, NEVER)
    with raises_errno(errno.ENAMETOOLONG):
        e.rename(a, b"f", a, b"x" * 256, 0, NEVER)
    assert e.lookup(a, b"f").ino == f
    check_tree(e)


def test_rename_replace_file(engine):
    e = engine
    st = Store(e)
    src = mkfile(e, ROOT_INODE, b"src")
    dst = mkfile(e, ROOT_INODE, b"dst")
    st.write(dst, 0, b"old" * 100)
    ids = {s.id for s in e.read_chunk(dst, 0)}
    moved, replaced = e.rename(ROOT_INODE, b"src", ROOT_INODE, b"dst", 0, NEVER)
    assert moved == src and replaced.ino == dst and replaced.nlink == 0
    assert e.lookup(ROOT_INODE, b"dst").ino == src
    with raises_errno(errno.ENOENT):
        e.getattr(dst)
    assert set(pending(e)) == ids
    # a replaced file with another link keeps living
    x = mkfile(e, ROOT_INODE, b"x")
    e.link(x, ROOT_INODE, b"x2")
    y = mkfile(e, ROOT_INODE, b"y")
    moved, replaced = e.rename(ROOT_INODE, b"y", ROOT_INODE, b"x", 0, NEVER)
    assert replaced.ino == x and replaced.nlink == 1 and e.getattr(x).nlink == 1
    # a replaced file that is open is sustained
    z = mkfile(e, ROOT_INODE, b"z")
    st.write(z, 0, b"zz")
    moved, replaced = e.rename(ROOT_INODE, b"x", ROOT_INODE, b"z", 0, ALWAYS)
    assert moved == y and replaced.ino == z and replaced.nlink == 0
    assert st.read(z) == b"zz"
    e.release_sustained(z)
    with raises_errno(errno.ENOENT):
        e.getattr(z)
    # a symlink and a fifo can replace files and each other
    s = e.mknod(ROOT_INODE, b"s", stat.S_IFLNK | 0o777, 0, 0, target=b"t").ino
    e.rename(ROOT_INODE, b"s", ROOT_INODE, b"x2", 0, NEVER)
    assert e.readlink(e.lookup(ROOT_INODE, b"x2").ino) == b"t"
    with raises_errno(errno.ENOENT):
        e.getattr(x)
    assert e.getattr(s).nlink == 1
    check_tree(e)


def test_rename_directories(engine):
    e = engine
    a = mkdir(e, ROOT_INODE, b"a")
    b = mkdir(e, ROOT_INODE, b"b")
    d = mkdir(e, a, b"d")
    mkfile(e, d, b"inside")
    assert e.getattr(a).nlink == 3 and e.getattr(b).nlink == 2
    e.rename(a, b"d", b, b"d2", 0, NEVER)
    assert e.getattr(a).nlink == 2 and e.getattr(b).nlink == 3
    assert e.lookup(d, b"..").ino == b
    # directory over an empty directory
    empty = mkdir(e, a, b"empty")
    moved, replaced = e.rename(b, b"d2", a, b"empty", 0, NEVER)
    assert moved == d and replaced.ino == empty and replaced.nlink == 0
    with raises_errno(errno.ENOENT):
        e.getattr(empty)
    assert e.getattr(a).nlink == 3 and e.getattr(b).nlink == 2
    assert e.lookup(d, b"..").ino == a
    # same-parent directory over an empty directory
    e2 = mkdir(e, a, b"e2")
    e.rename(a, b"empty", a, b"e2", 0, NEVER)
    assert e.getattr(a).nlink == 3
    with raises_errno(errno.ENOENT):
        e.getattr(e2)
    # over a non-empty directory, over a file, file over a directory
    full = mkdir(e, b, b"full")
    mkfile(e, full, b"x")
    with raises_errno(errno.ENOTEMPTY):
        e.rename(a, b"e2", b, b"full", 0, NEVER)
    f = mkfile(e, b, b"file")
    with raises_errno(errno.ENOTDIR):
        e.rename(a, b"e2", b, b"file", 0, NEVER)
    with raises_errno(errno.EISDIR):
        e.rename(b, b"file", a, b"e2", 0, NEVER)
    assert e.lookup(b, b"file").ino == f and e.lookup(a, b"e2").ino == d
    check_tree(e)


def test_rename_loops(engine):
    e = engine
    a = mkdir(e, ROOT_INODE, b"a")
    b = mkdir(e, a, b"b")
    c = mkdir(e, b, b"c")
    mkfile(e, c, b"f")
    with raises_errno(errno.EINVAL):  # into itself
        e.rename(ROOT_INODE, b"a", a, b"x", 0, NEVER)
    with raises_errno(errno.EINVAL):  # into its subtree
        e.rename(ROOT_INODE, b"a", c, b"x", 0, NEVER)
    with raises_errno(errno.EINVAL):
        e.rename(a, b"b", c, b"b", 0, NEVER)
    with raises_errno(errno.ENOTEMPTY):  # target is an ancestor of the source
        e.rename(c, b"f", ROOT_INODE, b"a", 0, NEVER)
    with raises_errno(errno.ENOTEMPTY):
        e.rename(b, b"c", ROOT_INODE, b"a", 0, NEVER)
    with raises_errno(errno.EINVAL):  # exchange with an ancestor
        e.rename(c, b"f", ROOT_INODE, b"a", RENAME_EXCHANGE, NEVER)
    with raises_errno(errno.EINVAL):
        e.rename(ROOT_INODE, b"a", c, b"f", RENAME_EXCHANGE, NEVER)
    # moving up is fine
    e.rename(b, b"c", ROOT_INODE, b"c", 0, NEVER)
    assert e.lookup(c, b"..").ino == ROOT_INODE
    e.rename(ROOT_INODE, b"a", c, b"a", 0, NEVER)
    assert e.lookup(a, b"..").ino == c
    check_tree(e)


def test_rename_noreplace(engine):
    e = engine
    f = mkfile(e, ROOT_INODE, b"f")
    g = mkfile(e, ROOT_INODE, b"g")
    with raises_errno(errno.EEXIST):
        e.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_NOREPLACE, NEVER)
    with raises_errno(errno.EEXIST):  # Linux: even onto itself
        e.rename(ROOT_INODE, b"f", ROOT_INODE, b"f", RENAME_NOREPLACE, NEVER)
    assert e.rename(ROOT_INODE, b"f", ROOT_INODE, b"h", RENAME_NOREPLACE, NEVER) == (f, None)
    assert e.lookup(ROOT_INODE, b"g").ino == g
    check_tree(e)


def test_rename_exchange(engine):
    e = engine
    a = mkdir(e, ROOT_INODE, b"a")
    b = mkdir(e, ROOT_INODE, b"b")
    f = mkfile(e, a, b"f")
    g = mkfile(e, b, b"g")
    with raises_errno(errno.ENOENT):
        e.rename(a, b"f", b, b"missing", RENAME_EXCHANGE, NEVER)
    for ino in (a, b, f, g):
        age(e, ino)
    assert e.rename(a, b"f", b, b"g", RENAME_EXCHANGE, NEVER) == (f, None)
    assert e.lookup(a, b"f").ino == g and e.lookup(b, b"g").ino == f
    assert all(touched(e, ino) or e.getattr(ino).ctime_ns > 1000 for ino in (a, b, f, g))
    # a directory and a file across parents: nlink moves with the directory
    d = mkdir(e, a, b"d")
    mkfile(e, d, b"x")
    assert e.getattr(a).nlink == 3 and e.getattr(b).nlink == 2
    e.rename(a, b"d", b, b"g", RENAME_EXCHANGE, NEVER)
    assert e.lookup(b, b"g").ino == d and e.lookup(a, b"d").ino == f
    assert e.getattr(a).nlink == 2 and e.getattr(b).nlink == 3
    assert e.lookup(d, b"..").ino == b
    # two directories swap parents (non-empty is fine for an exchange)
    d2 = mkdir(e, a, b"d2")
    e.rename(a, b"d2", b, b"g", RENAME_EXCHANGE, NEVER)
    assert e.lookup(a, b"d2").ino == d and e.lookup(b, b"g").ino == d2
    assert e.lookup(d, b"..").ino == a and e.lookup(d2, b"..").ino == b
    assert e.getattr(a).nlink == 3 and e.getattr(b).nlink == 3
    # within one directory
    e.rename(a, b"d", a, b"d2", RENAME_EXCHANGE, NEVER)
    assert e.lookup(a, b"d").ino == d and e.lookup(a, b"d2").ino == f
    assert e.getattr(a).nlink == 3
    check_tree(e)


def test_rename_same_inode(engine):
    e = engine
    f = mkfile(e, ROOT_INODE, b"f")
    e.link(f, ROOT_INODE, b"g")
    age(e, f)
    age(e, ROOT_INODE)
    assert e.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 0, NEVER) == (f, None)
    assert e.lookup(ROOT_INODE, b"f").ino == f and e.lookup(ROOT_INODE, b"g").ino == f
    assert e.getattr(f).nlink == 2 and e.getattr(f).ctime_ns == 1000
    assert e.getattr(ROOT_INODE).mtime_ns == 1000
    assert e.rename(ROOT_INODE, b"f", ROOT_INODE, b"f", 0, NEVER) == (f, None)
    d = mkdir(e, ROOT_INODE, b"d")
    assert e.rename(ROOT_INODE, b"d", ROOT_INODE, b"d", 0, NEVER) == (d, None)
    assert e.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_EXCHANGE, NEVER) == (f, None)
    check_tree(e)


# ============================================================ data, slices
def test_write_and_read_chunk(engine):
    e = engine
    st = Store(e)
    f = e.getattr(mkfile(e, ROOT_INODE, b"f"))
    assert e.read_chunk(f.ino, 0) == []
    data = random.Random(1).randbytes(3 * CS + 123)
    a = st.write(f.ino, 100, data)
    assert a.length == 100 + len(data) and a.data_version == f.data_version + 1
    assert a.mtime_ns == a.ctime_ns and a == e.getattr(f.ino)
    assert st.read(f.ino) == bytes(100) + data
    assert len(e.read_chunk(f.ino, 0)) == 1 and len(e.read_chunk(f.ino, 3)) == 1
    assert e.read_chunk(f.ino, 4) == []
    # min_length below the length does not shrink; an explicit mtime is kept
    sid = e.next_slice_id()
    st.objects[sid] = b"abc"
    a = e.write(f.ino, [(0, Slice(0, sid, 3, 0, 3))], 3, 12345)
    assert a.length == 100 + len(data) and a.mtime_ns == a.ctime_ns == 12345
    assert st.read(f.ino, 0, 5) == b"abc\0\0"
    # padded objects: the slice shows bytes from the middle of its object
    st.write(f.ino, 10, b"middle", padded=True)
    assert st.read(f.ino, 8, 10) == b"\0\0middle\0\0"
    assert e.usage().used_space == (100 + len(data) + 4095) // 4096 * 4096
    with raises_errno(errno.ENOENT):
        e.read_chunk(999999, 0)
    with raises_errno(errno.ENOENT):
        e.write(999999, [(0, Slice(0, e.next_slice_id(), 1, 0, 1))], 1, 1)
    d = mkdir(e, ROOT_INODE, b"d")
    with raises_errno(errno.EISDIR):
        e.write(d, [(0, Slice(0, e.next_slice_id(), 1, 0, 1))], 1, 1)
    for bad in (Slice(CS - 1, 7, 2, 0, 2), Slice(0, 7, 2, 0, 0), Slice(0, 7, 2, 1, 2), Slice(-1, 7, 2, 0, 1)):
        with raises_errno(errno.EINVAL):
            e.write(f.ino, [(0, bad)], 1, 1)
    with raises_errno(errno.EINVAL):
        e.write(f.ino, [(-1, Slice(0, 7, 1, 0, 1))], 1, 1)


def test_rewrite_with_expected_version_is_compaction(engine):
    """``write(..., expect_version=v)``: commits only at version v and, the bytes being
    the same, leaves data_version, mtime and ctime alone; the old slices are queued."""
    e = engine
    st = Store(e)
    f = mkfile(e, ROOT_INODE, b"f")
    st.write(f, 0, b"a" * 100)
    st.write(f, 10, b"b" * 10)
    before = e.getattr(f)
    old = {s.id for s in e.read_chunk(f, 0)}
    content = st.read(f)
    with raises_errno(errno.EAGAIN):  # a version that is gone: nothing is committed
        e.write(f, st.slices_for(0, content), 0, 5, expect_version=before.data_version - 1)
    assert {s.id for s in e.read_chunk(f, 0)} == old
    rows = e.read_chunk(f, 0)
    [(idx, new)] = st.slices_for(0, content)
    after = e.write(f, [(idx, new)], 0, 5, expect_version=before.data_version, expect_rows=rows)
    assert (after.data_version, after.mtime_ns, after.ctime_ns, after.length) == \
        (before.data_version, before.mtime_ns, before.ctime_ns, before.length)
    assert e.getattr(f) == after
    assert [s.id for s in e.read_chunk(f, 0)] == [new.id] and old <= set(pending(e))
    assert st.read(f) == content
    # a second rewrite of the rows read before the first (another client's compaction):
    # the version has not moved, the rows have
    with raises_errno(errno.EAGAIN):
        e.write(f, st.slices_for(0, content), 0, 5, expect_version=before.data_version, expect_rows=rows)
    assert [s.id for s in e.read_chunk(f, 0)] == [new.id]
    # a write moves the version on: a rewrite read before it is refused
    st.write(f, 0, b"c")
    with raises_errno(errno.EAGAIN):
        e.write(f, st.slices_for(0, content), 0, 5, expect_version=before.data_version)
    assert st.read(f) == b"c" + content[1:]


def test_write_many_slices_per_call_and_empty_commit(engine):
    e = engine
    st = Store(e)
    f = mkfile(e, ROOT_INODE, b"f")
    slices = st.slices_for(0, b"a" * 100) + st.slices_for(50, b"b" * 100) + st.slices_for(CS - 10, b"c" * 20)
    a = e.write(f, slices, CS + 10, 99)
    assert a.length == CS + 10
    assert st.read(f) == b"a" * 50 + b"b" * 100 + bytes(CS - 160) + b"c" * 20
    a2 = e.write(f, [], CS + 20, 100)  # no data: length and times only
    assert a2.length == CS + 20 and a2.data_version == a.data_version + 1


def test_a_slice_hidden_by_the_next_of_its_own_commit_is_queued(engine):
    """One commit of a small write and a larger one over it (pwrite 100 B at 1000,
    then 2000 B at 0, then fsync): the first slice is added and hidden at once.  The
    Redis engine failed every such commit (HINCRBY by Lua's -0), so the writes were
    retried forever and lost at unmount."""
    e = engine
    st = Store(e)
    f = mkfile(e, ROOT_INODE, b"f")
    [(_, P)] = st.slices_for(1000, b"p" * 100)
    [(_, Q)] = st.slices_for(0, b"q" * 2000)
    a = e.write(f, [(0, P), (0, Q)], 2000, 1)
    assert a.length == 2000 and st.read(f) == b"q" * 2000
    assert [s.id for s in e.read_chunk(f, 0)] == [Q.id]
    assert pending(e) == {P.id: P.size}


def test_compaction_queues_exactly_hidden_slices(engine):
    e = engine
    st = Store(e)
    f = mkfile(e, ROOT_INODE, b"f")

    def ids(idx=0):
        return [s.id for s in e.read_chunk(f, idx)]

    [(_, A)] = st.slices_for(0, b"A" * 100)
    [(_, B)] = st.slices_for(50, b"B" * 100)
    [(_, C)] = st.slices_for(0, b"C" * 60)
    e.write(f, [(0, A)], 100, 1)
    e.write(f, [(0, B)], 150, 1)
    assert ids() == [A.id, B.id] and pending(e) == {}  # A still shows in [0, 50)
    e.write(f, [(0, C)], 150, 1)
    assert ids() == [B.id, C.id] and pending(e) == {A.id: A.size}
    assert st.read(f) == b"C" * 60 + b"B" * 90
    # a slice exactly on top of another hides it; a disjoint one hides nothing
    [(_, D)] = st.slices_for(60, b"D" * 90)
    [(_, E)] = st.slices_for(1000, b"E" * 10)
    e.write(f, [(0, D), (0, E)], 1010, 1)
    assert ids() == [C.id, D.id, E.id] and set(pending(e)) == {A.id, B.id}
    # the same object shown in two chunks is queued only when no chunk shows it
    X = e.next_slice_id()
    st.objects[X] = b"X" * 200
    e.write(f, [(0, Slice(CS - 100, X, 200, 0, 100)), (1, Slice(0, X, 200, 100, 100))], CS + 100, 1)
    assert st.read(f, CS - 100, 200) == b"X" * 200
    [(_, Y)] = st.slices_for(CS - 100, b"Y" * 100)
    e.write(f, [(0, Y)], CS + 100, 1)
    assert X not in pending(e) and ids(1) == [X]
    [(_, Z)] = st.slices_for(CS, b"Z" * 100)
    e.write(f, [(1, Z)], CS + 100, 1)
    assert pending(e)[X] == 200 and ids(1) == [Z.id]
    # every remaining row shows through somewhere
    for idx in (0, 1):
        assert hidden_rows(e.read_chunk(f, idx)) == []
    # done_deletes forgets exactly what it is told
    e.done_deletes([A.id, 424242])
    assert set(pending(e)) == {B.id, X}
    first = min(B.id, X)
    assert e.pending_deletes(1) == [(first, len(st.objects[first]))]
    e.done_deletes([])
    e.done_deletes([B.id, X])
    assert pending(e) == {}


def test_scan_slices_names_every_slice_of_every_file_once(engine):
    e = engine
    st = Store(e)
    assert e.scan_slices() == set()
    d = mkdir(e, ROOT_INODE, b"d")
    f, g = mkfile(e, ROOT_INODE, b"f"), mkfile(e, d, b"g")
    st.write(f, 0, b"f" * 100)
    st.write(f, CS - 10, b"F" * 30)  # one slice id per chunk piece: two chunks
    st.write(g, 5, b"g" * 7)
    e.setattr(g, SetAttr(length=3 * CS))  # a hole: not a slice
    # one object shown in two chunks of a file is named once
    X = e.next_slice_id()
    e.write(f, [(2, Slice(0, X, 200, 0, 100)), (3, Slice(0, X, 200, 100, 100))], 3 * CS + 100, 1)

    def rows(ino, idxs):
        return {(s.id, s.size, ino) for i in idxs for s in e.read_chunk(ino, i) if s.id}

    want = rows(f, range(4)) | rows(g, range(3))
    assert len(want) == 5 and (X, 200, f) in want
    assert e.scan_slices() == want
    # hidden slices leave the scan for the delete queue; a removed file leaves it
    [(hidden, _, _)] = rows(g, [0])
    st.write(g, 0, b"G" * 20)
    assert hidden in pending(e) and hidden not in {sid for sid, _, _ in e.scan_slices()}
    e.unlink(d, b"g", lambda ino: False)
    assert e.scan_slices() == rows(f, range(4))


def test_truncate_down_and_up_reads_a_hole(engine):
    e = engine
    st = Store(e)
    f = mkfile(e, ROOT_INODE, b"f")
    data = random.Random(2).randbytes(2 * CS + 500)
    st.write(f, 0, data)
    chunk2 = {s.id for s in e.read_chunk(f, 2)}
    chunk1 = {s.id for s in e.read_chunk(f, 1)}
    e.setattr(f, SetAttr(length=CS + 10))
    assert set(pending(e)) == chunk2 and e.read_chunk(f, 2) == []
    holes = [s for s in e.read_chunk(f, 1) if s.id == 0]
    assert holes == [Slice(10, 0, 0, 0, CS - 10)]
    e.setattr(f, SetAttr(length=3 * CS))
    out = st.read(f)
    assert out == data[:CS + 10] + bytes(2 * CS - 10)
    segs = overlay(e.read_chunk(f, 1), 0, CS)
    assert [(s.pos, s.len, s.id) for s in segs] == [(0, 10, list(chunk1)[0]), (10, CS - 10, 0)]
    # truncating again where only holes lie adds nothing
    e.setattr(f, SetAttr(length=CS + 5))
    e.setattr(f, SetAttr(length=CS + 500))
    rows = e.read_chunk(f, 1)
    assert [s.id for s in rows].count(0) == 1 and len(rows) == 2
    assert st.read(f) == data[:CS + 5] + bytes(495)
    # exactly on a chunk boundary: the chunk goes, no hole is needed
    e.setattr(f, SetAttr(length=CS))
    assert e.read_chunk(f, 1) == [] and set(pending(e)) == chunk1 | chunk2
    assert [s.id for s in e.read_chunk(f, 0) if s.id == 0] == []
    # a write past the end after truncating: the gap reads as zeros
    st.write(f, CS + 100, b"tail")
    assert st.read(f, CS - 2) == data[CS - 2:CS] + bytes(100) + b"tail"
    # down to zero: everything is queued
    e.setattr(f, SetAttr(length=0))
    assert e.read_chunk(f, 0) == [] and e.read_chunk(f, 1) == []
    assert e.usage().used_space == 0
    assert set(pending(e)) == st.objects.keys()


def test_random_writes_and_truncates_against_a_model(engine):
    """Random overlapping writes and truncates (fixed seeds) compared byte for byte
    with a bytearray; after each step every row shows through, and every slice ever
    committed is either named by a chunk row or pending deletion, never both."""
    e = engine
    for seed in range(4):
        rng = random.Random(seed)
        st = Store(e, seed)
        f = mkfile(e, ROOT_INODE, f"f{seed}".encode())
        model = bytearray()
        e.done_deletes(list(pending(e)))
        for step in range(60):
            r = rng.random()
            if r < 0.7:
                off = rng.randrange(0, 3 * CS)
                n = rng.choice([1, 7, 100, 4096, rng.randrange(1, CS), rng.randrange(1, 2 * CS)])
                data = rng.randbytes(n)
                st.write(f, off, data, padded=rng.random() < 0.3)
                if off > len(model):
                    model += bytes(off - len(model))
                model[off:off + n] = data
            else:
                n = rng.randrange(0, 3 * CS)
                e.setattr(f, SetAttr(length=n))
                model = model[:n] + bytes(max(0, n - len(model)))
            assert e.getattr(f).length == len(model)
            assert st.read(f) == bytes(model), (seed, step)
            named = set()
            last = (len(model) - 1) // CS if model else -1
            for idx in range(6):  # writes end before 5 * CS
                rows = e.read_chunk(f, idx)
                if idx > last:
                    assert all(s.id == 0 for s in rows)
                assert hidden_rows(rows) == [], (seed, step, idx)
                named |= {s.id for s in rows if s.id}
            queued = set(pending(e))
            assert not named & queued
            assert named | queued == set(st.objects)
            for sid, size in pending(e).items():
                assert size == len(st.objects[sid])
        e.unlink(ROOT_INODE, f"f{seed}".encode(), NEVER)
        assert set(pending(e)) == set(st.objects)
    assert e.usage().used_space == 0


def test_capacity_enospc_commits_nothing(engines):
    e = engines(init=True, capacity=3 * 4096)
    st = Store(e)
    f = mkfile(e, ROOT_INODE, b"f")
    st.write(f, 0, b"x" * 8192)
    before = (e.getattr(f), e.read_chunk(f, 0), pending(e), e.usage())
    sl = st.slices_for(0, b"y" * 100)  # overwrites would hide the first slice...
    with raises_errno(errno.ENOSPC):
        e.write(f, sl, 3 * 4096 + 1, 1)  # ...but the length is over capacity
    assert (e.getattr(f), e.read_chunk(f, 0), pending(e), e.usage()) == before
    with raises_errno(errno.ENOSPC):
        e.setattr(f, SetAttr(length=4 * 4096))
    assert e.getattr(f) == before[0]
    e.write(f, sl, 3 * 4096, 1)  # exactly at capacity is fine
    s = e.statfs()
    assert s.total_space == 3 * 4096 and s.avail_space == 0
    e.setattr(f, SetAttr(length=0))
    assert e.statfs().avail_space == 3 * 4096


def test_inode_limit_and_statfs(engines):
    e = engines(init=True, inodes=4)
    s = e.statfs()
    assert (s.used_inodes, s.avail_inodes) == (1, 3)  # the root counts
    assert s.total_space == 1 << 50 and s.avail_space == 1 << 50
    mkfile(e, ROOT_INODE, b"a")
    d = mkdir(e, ROOT_INODE, b"b")
    mkfile(e, d, b"c")
    with raises_errno(errno.ENOSPC):
        mkfile(e, ROOT_INODE, b"d")
    s = e.statfs()
    assert (s.used_inodes, s.avail_inodes) == (4, 0)
    e.unlink(ROOT_INODE, b"a", NEVER)
    mkfile(e, ROOT_INODE, b"d")
    assert e.usage().used_inodes == 4


def test_statfs_unlimited(engine):
    st = Store(engine)
    f = mkfile(engine, ROOT_INODE, b"f")
    st.write(f, 0, b"x" * 5000)
    s = engine.statfs()
    assert s.total_space == 1 << 50 and s.avail_space == (1 << 50) - 8192
    assert s.used_inodes == 2 and s.avail_inodes > 1 << 20


# ============================================================ ids, sessions
def test_next_slice_id_unique_across_clients_threads_and_crashes(engines, meta_url):
    a = engines(init=True)
    b = engines()
    got = [a.next_slice_id(), b.next_slice_id(), a.next_slice_id(), b.next_slice_id()]
    assert all(x > 0 for x in got) and len(set(got)) == 4
    assert got[0] < got[2] and got[1] < got[3]
    results: list[int] = []
    lock = threading.Lock()

    def worker(e):
        mine = [e.next_slice_id() for _ in range(300)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker, args=(x,)) for x in (a, b) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2400 and not set(results) & set(got) and len(set(results)) == 2400
    # a client that dies without closing never gets its ids handed out again
    out = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from curvefs_py.meta import open_engine\n"
        "e = open_engine(sys.argv[1])\n"
        "print(e.next_slice_id(), e.next_slice_id(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"), meta_url],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL, out.stderr
    crashed = [int(x) for x in out.stdout.split()]
    c = engines()
    after = c.next_slice_id()
    assert after > max(crashed) and after not in results + got
    assert a.next_slice_id() not in crashed + results + got + [after]


def test_committed_transaction_survives_kill(engines, meta_url):
    engines(init=True, session=False)
    out = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from curvefs_py.meta import open_engine\n"
        "e = open_engine(sys.argv[1])\n"
        "a = e.mknod(1, b'survivor', 0o100644, 0, 0)\n"
        "e.setxattr(a.ino, b'user.k', b'v')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"), meta_url],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL, out.stderr
    e = engines()
    ino = e.lookup(ROOT_INODE, b"survivor").ino
    assert e.getxattr(ino, b"user.k") == b"v"
    check_tree(e)


def test_sessions(engines):
    a = engines(init=True)
    assert a.sid > 0
    b = engines(session=False)
    sid = b.new_session({"host": "h2", "pid": 42, "mountpoint": "/m2", "version": "v"})
    assert sid == b.sid and sid != a.sid
    sessions = {s["sid"]: s for s in a.list_sessions()}
    assert set(sessions) == {a.sid, b.sid}
    assert sessions[b.sid]["host"] == "h2" and sessions[b.sid]["pid"] == 42
    assert abs(sessions[b.sid]["heartbeat"] - time.time()) < 60
    hb = sessions[b.sid]["heartbeat"]
    time.sleep(0.01)
    b.heartbeat()
    assert {s["sid"]: s for s in a.list_sessions()}[b.sid]["heartbeat"] > hb
    # closing a session releases what it sustains
    st = Store(b)
    f = mkfile(b, ROOT_INODE, b"f")
    st.write(f, 0, b"x")
    g = mkfile(b, ROOT_INODE, b"g")  # open but not unlinked: untouched
    b.unlink(ROOT_INODE, b"f", ALWAYS)
    assert a.getattr(f).nlink == 0
    b.close_session()
    assert b.sid == 0
    with raises_errno(errno.ENOENT):
        a.getattr(f)
    assert a.getattr(g).nlink == 1
    assert set(pending(a)) == set(st.objects)
    assert [s["sid"] for s in a.list_sessions()] == [a.sid]


def test_a_file_sustained_by_two_sessions(engines):
    a = engines(init=True)
    b = engines()
    f = mkfile(a, ROOT_INODE, b"f")
    e2 = mkfile(a, ROOT_INODE, b"e2")
    a.link(f, ROOT_INODE, b"f2")
    a.unlink(ROOT_INODE, b"f", ALWAYS)
    b.unlink(ROOT_INODE, b"f2", ALWAYS)  # b holds it open too
    a.release_sustained(f)
    assert a.getattr(f).nlink == 0  # b still sustains it
    b.release_sustained(f)
    with raises_errno(errno.ENOENT):
        a.getattr(f)
    assert a.getattr(e2).nlink == 1


def test_clean_stale_sessions(engines):
    a = engines(init=True)
    b = engines()
    st = Store(b)
    f = mkfile(b, ROOT_INODE, b"f")
    st.write(f, 0, b"stale data")
    b.unlink(ROOT_INODE, b"f", ALWAYS)
    assert a.clean_stale_sessions(3600) == []
    time.sleep(0.05)
    a.heartbeat()
    stale_sid = b.sid
    assert a.clean_stale_sessions(0.02) == [stale_sid]  # never its own session
    with raises_errno(errno.ENOENT):
        a.getattr(f)
    assert set(pending(a)) == set(st.objects)
    assert [s["sid"] for s in a.list_sessions()] == [a.sid]
    b.sid = 0  # b is "dead": nothing left to close


def test_heartbeat_after_being_cleaned_registers_again(engines, caplog):
    a = engines(init=True)
    b = engines()
    time.sleep(0.05)
    a.heartbeat()
    assert a.clean_stale_sessions(0.02) == [b.sid]
    b.heartbeat()
    assert b.sid in [s["sid"] for s in a.list_sessions()]
    assert any("registered again" in r.getMessage() for r in caplog.records)
    caplog.clear()


def test_two_clients_share_the_namespace(engines):
    a = engines(init=True)
    b = engines()
    d = mkdir(a, ROOT_INODE, b"d")
    assert b.lookup(ROOT_INODE, b"d").ino == d
    b.rename(ROOT_INODE, b"d", ROOT_INODE, b"e", 0, NEVER)
    assert a.lookup(ROOT_INODE, b"e").ino == d
    assert a.load() == b.load()


# ============================================================ change feed
def test_change_feed_carries_changes_of_others_with_their_versions(engines):
    a = engines(init=True)
    b = engines()
    cursor, none = b.changes_since(-1)
    assert none == []
    a.publish([Change(0, 0, ino=5, version=7), Change(0, 0, parent=ROOT_INODE, name=b"x")])
    b.publish([Change(0, 0, ino=6, version=2)])
    cursor2, got = b.changes_since(cursor)
    assert [(c.ino, c.parent, c.name, c.version, c.sid != 0) for c in got] == \
        [(5, 0, b"", 7, True), (0, ROOT_INODE, b"x", -1, True)]  # not its own
    assert b.changes_since(cursor2) == (cursor2, [])
    _, mine = a.changes_since(cursor)
    assert [(c.ino, c.version) for c in mine] == [(6, 2)]


def test_change_feed_of_a_volume_from_before_versions(engines, meta_url):
    """A changelog table made before the version column: its rows read as version
    -1 (unknown: others drop their pages, as before), and the first publish adds
    the column. Uses the SQL engines' internal ``_txn`` to drop the column (Redis:
    ``_plain`` to add an entry as older clients wrote them)."""
    a = engines(init=True)
    cursor, _ = a.changes_since(-1)
    if meta_url.startswith("redis"):  # an entry of an older client: no "v" field
        from curvefs_py.meta.redis import CHANGES_KEY

        a._plain([(b"XADD", CHANGES_KEY, b"*", b"s", 999, b"i", 5, b"p", 0, b"n", b"")])
        _, got = engines().changes_since(cursor)
        assert [(ch.ino, ch.version) for ch in got] == [(5, -1)]
        return
    a.publish([Change(0, 0, ino=5, version=7)])
    a._txn(lambda tx: tx.run("ALTER TABLE changelog DROP COLUMN version"))
    b, c = engines(), engines()  # clients that have not seen the column yet
    _, got = b.changes_since(cursor)
    assert [(ch.ino, ch.version) for ch in got] == [(5, -1)]
    c.publish([Change(0, 0, ino=6, version=3)])
    _, got = b.changes_since(cursor)
    assert [(ch.ino, ch.version) for ch in got] == [(5, -1), (6, 3)]


# =============================================================== concurrency
def run_threads(n: int, fn: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def wrap(i):
        try:
            fn(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]


def test_concurrent_mknod_in_one_directory(engines):
    e = engines(init=True)
    other = engines()  # a second client on the same database
    d = mkdir(e, ROOT_INODE, b"d")
    per, n = 40, 8
    inos: list[int] = []
    lock = threading.Lock()

    def work(i):
        eng = e if i % 2 else other
        mine = []
        for j in range(per):
            name = f"t{i}-{j}".encode()
            mine.append((mkdir if j % 4 == 0 else mkfile)(eng, d, name))
            if j % 10 == 9:  # some contention on existing names
                with raises_errno(errno.EEXIST):
                    mkfile(eng, d, name)
        with lock:
            inos.extend(mine)

    run_threads(n, work)
    assert len(inos) == per * n == len(set(inos))
    ents = e.readdir(d)
    assert len(ents) == per * n
    dirs = sum(1 for x in ents if x.attr.is_dir)
    assert dirs == n * per // 4
    assert e.getattr(d).nlink == 2 + dirs
    assert e.usage().used_inodes == per * n + 2
    check_tree(e)


def test_concurrent_writes_to_one_file(engine):
    e = engine
    st = Store(e)
    f = mkfile(e, ROOT_INODE, b"f")
    lock = threading.Lock()
    pieces = {}

    def work(i):
        for j in range(20):
            off = (i * 20 + j) * 1000
            data = bytes([i * 20 + j]) * 1000
            with lock:
                sl = st.slices_for(off, data)
            e.write(f, sl, off + 1000, time.time_ns())
            pieces[off] = data

    run_threads(8, work)
    assert e.getattr(f).length == 160 * 1000
    assert st.read(f) == b"".join(pieces[k] for k in sorted(pieces))
    assert e.usage().used_space == (160000 + 4095) // 4096 * 4096
    assert pending(e) == {}


def test_rename_stress(engines):
    """Threads move files and directories at random between directories (a
    directory may be moved under one of its own descendants: EINVAL); the tree
    must stay a tree with the right link counts."""
    e = engines(init=True)
    other = engines()
    dirs = [ROOT_INODE] + [mkdir(e, ROOT_INODE, f"d{i}".encode()) for i in range(6)]
    for i in range(30):
        mkfile(e, dirs[i % len(dirs)], f"f{i}".encode())
    ok_errors = {errno.ENOENT, errno.EINVAL, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}
    done = Counter()
    lock = threading.Lock()

    def work(i):
        rng = random.Random(i)
        eng = e if i % 2 else other
        for _ in range(150):
            src, dst = rng.choice(dirs), rng.choice(dirs)
            try:
                ents = eng.readdir(src)
            except FsError as exc:
                assert exc.errno == errno.ENOENT
                continue
            if not ents:
                continue
            name = rng.choice(ents).name
            newname = rng.choice([name, f"n{rng.randrange(40)}".encode(), f"d{rng.randrange(6)}".encode()])
            flags = rng.choice([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
            try:
                eng.rename(src, name, dst, newname, flags, NEVER)
                result = "ok"
            except FsError as exc:
                assert exc.errno in ok_errors, exc
                result = errno.errorcode[exc.errno]
            with lock:
                done[result] += 1

    run_threads(8, work)
    assert done["ok"] > 100, done
    links = check_tree(e)
    assert e.usage().used_inodes == len(links) + 1


# ====================================================== engine-specific: sqlite
def sqlite_only(meta_url):
    if not meta_url.startswith("sqlite"):
        pytest.skip("SQLite-specific")


def test_sqlite_urls(tmp_path, monkeypatch):
    from curvefs_py.meta.sqlite import SqliteEngine, parse_url

    assert parse_url("sqlite3:///abs/x.db") == ("/abs/x.db", {})
    monkeypatch.chdir(tmp_path)
    assert parse_url("sqlite3://rel.db")[0] == str(tmp_path / "rel.db")
    assert parse_url("sqlite://dir/rel.db?sync=normal") == (str(tmp_path / "dir/rel.db"), {"sync": "normal"})
    for bad in ("sqlite3://", "sqlite3://:memory:", "sqlite3:///x.db?sync=off", "sqlite3:///x.db?bogus=1",
                "sqlite3:///x.db?busy_timeout=soon", "redis://x"):
        with pytest.raises(QuietError) as info:
            parse_url(bad)
        assert info.value.exitcode == 3
    e = SqliteEngine("sqlite3://rel.db?sync=normal&busy_timeout=100")
    e.init(make_format())
    assert e.load().chunk_size == CS
    e.close()
    assert (tmp_path / "rel.db").exists()
    assert not (tmp_path / "missing.db").exists()
    e = SqliteEngine("sqlite3://missing.db")
    with raises_errno(errno.ENOENT):
        e.load()
    e.close()
    assert not (tmp_path / "missing.db").exists()  # load does not create a database


def test_sqlite_wal_and_full_sync(engine, meta_url):
    sqlite_only(meta_url)
    conn = engine._get_conn(False)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        engine._put_conn(conn, False)


def test_sqlite_busy_is_retried_and_counted(engines, meta_url, monkeypatch):
    """Another process holding the write lock: the engine waits (busy_timeout),
    retries and succeeds; if the lock is never released, MetaError."""
    import sqlite3

    from curvefs_py.meta import sql as sqlmod
    from curvefs_py.meta.sqlite import SqliteEngine, parse_url

    sqlite_only(meta_url)
    engines(init=True, session=False)
    e = SqliteEngine(meta_url + "?busy_timeout=20")
    try:
        path = parse_url(meta_url)[0]
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        before = metrics.get("meta_txn_retries")
        timer = threading.Timer(0.3, blocker.rollback)
        timer.start()
        mkfile(e, ROOT_INODE, b"after-busy")
        timer.join()
        assert metrics.get("meta_txn_retries") > before
        assert e.lookup(ROOT_INODE, b"after-busy")
        assert metrics.get("meta_txn_count") > 0
        monkeypatch.setattr(sqlmod, "MAX_ATTEMPTS", 2)
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(MetaError):
            mkfile(e, ROOT_INODE, b"never")
        assert e.getattr(ROOT_INODE).nlink == 2  # reads are not blocked by a writer
        blocker.rollback()
        blocker.close()
        mkfile(e, ROOT_INODE, b"later")
    finally:
        e.close()


# ==================================================== engine-specific: postgres
def postgres_only(meta_url):
    if not meta_url.startswith("postgres"):
        pytest.skip("PostgreSQL-specific")


def test_postgres_urls():
    from curvefs_py.meta.postgres import parse_url, redact

    p = parse_url("postgres://u:p%40ss@db.example:6432/vol?sslmode=require&connect_timeout=3")
    assert p == {"user": "u", "password": "p@ss", "host": "db.example", "port": "6432", "dbname": "vol",
                 "sslmode": "require", "connect_timeout": "3"}
    assert parse_url("postgresql://h/vol")["dbname"] == "vol"
    assert redact("postgres://u:secret@h:5/d") == "postgres://u:***@h:5/d"
    for bad in ("postgres://u:secret@h:5/", "postgres://u:secret@h/d?bogus=1", "sqlite3:///x.db"):
        with pytest.raises(QuietError) as info:
            parse_url(bad)
        assert info.value.exitcode == 3
        assert "secret" not in str(info.value)


def test_postgres_connection_errors_are_one_line(pg):
    """Unreachable server, bad password, missing database (created by init only, and
    only with the right to): FsError/MetaError with one line that hides the password."""
    from curvefs_py.meta.postgres import PostgresEngine
    from servers import free_port

    def error_of(url: str, call=lambda e: e.load()) -> FsError:
        e = PostgresEngine(url)
        try:
            with pytest.raises(FsError) as info:
                call(e)
        finally:
            e.close()
        msg = str(info.value)
        assert "\n" not in msg and "s3cret" not in msg, msg
        return info.value

    t0 = time.monotonic()
    exc = error_of(f"postgres://u:s3cret@127.0.0.1:{free_port()}/x")
    assert isinstance(exc, MetaError) and "refused" in str(exc)
    assert time.monotonic() - t0 < 5
    exc = error_of(pg.url_for(pg.dbname, password="s3cret"))
    assert isinstance(exc, MetaError) and "password authentication failed" in str(exc)

    missing = pg.url_for(f"missing_{os.getpid()}")
    exc = error_of(missing)
    assert exc.errno == errno.ENOENT and "does not exist" in str(exc)
    e = PostgresEngine(missing)
    e.init(make_format())  # format creates the database (the superuser may)
    assert e.load().chunk_size == CS
    e.close()

    pg.sql("DROP ROLE IF EXISTS nocreate")
    pg.sql("CREATE ROLE nocreate LOGIN PASSWORD 's3cret'")
    exc = error_of(pg.url_for(f"missing2_{os.getpid()}", user="nocreate", password="s3cret"),
                   lambda e: e.init(make_format()))
    assert exc.errno == errno.EACCES and "may not create it" in str(exc)


def test_postgres_serialization_failures_are_retried_and_counted(engines, meta_url, monkeypatch):
    """Another client commits a change to a row the transaction wrote: SQLSTATE 40001,
    retried (counted) and then successful; with no attempts left, MetaError and nothing
    of the operation committed.  Pooled connections killed by the server are replaced."""
    import psycopg

    from curvefs_py.meta import sql as sqlmod

    postgres_only(meta_url)
    e = engines(init=True)
    blocker = psycopg.connect(meta_url)  # not autocommit: the first statement begins a transaction

    def conflicting_mknod(name: bytes) -> None:
        """mknod while ``blocker`` holds the used_inodes row; blocker commits meanwhile."""
        blocker.execute("UPDATE counter SET value = value WHERE name = 'used_inodes'")
        timer = threading.Timer(0.3, blocker.commit)
        timer.start()
        try:
            mkfile(e, ROOT_INODE, name)
        finally:
            timer.join()

    try:
        before = metrics.get("meta_txn_retries")
        conflicting_mknod(b"after-conflict")
        assert metrics.get("meta_txn_retries") > before
        assert e.lookup(ROOT_INODE, b"after-conflict")
        monkeypatch.setattr(sqlmod, "MAX_ATTEMPTS", 1)
        with pytest.raises(MetaError) as info:
            conflicting_mknod(b"never")
        assert "serialize" in str(info.value)
        monkeypatch.undo()
        with raises_errno(errno.ENOENT):
            e.lookup(ROOT_INODE, b"never")
        assert e.usage().used_inodes == 2  # root, after-conflict

        e.getattr(ROOT_INODE)  # a pooled connection now idles
        before = metrics.get("meta_txn_retries")
        blocker.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        blocker.commit()
        assert e.getattr(ROOT_INODE).nlink == 2
        mkfile(e, ROOT_INODE, b"after-restart")
        assert metrics.get("meta_txn_retries") > before
    finally:
        blocker.close()


# ======================================================= engine-specific: redis
def redis_only(meta_url):
    if not meta_url.startswith("redis"):
        pytest.skip("Redis-specific")


def test_redis_scan_slices_pages_through_the_keyspace(engine, meta_url):
    """scan_slices walks SCAN's cursor to its end (each step a few keys here), skipping
    keys that only look like chunk lists."""
    redis_only(meta_url)
    e = engine
    st = Store(e)
    want = set()
    for i in range(60):
        f = mkfile(e, ROOT_INODE, b"f%d" % i)
        st.write(f, i * CS, b"x" * (i + 1))  # chunk i: its own c{ino}_{i} key
        want |= {(s.id, s.size, f) for s in e.read_chunk(f, i)}
    e._plain([(b"SET", b"c7_1x", b"matches the SCAN pattern, not a chunk list")])
    e.scan_count = 5
    assert e.scan_slices() == want and len(want) == 60


def test_redis_urls():
    from curvefs_py.meta.redis import RedisEngine, parse_url

    assert parse_url("redis://h:1/2") == "redis://h:1/2"
    assert parse_url("redis://:s3cret@h") == "redis://h:6379/0"
    assert parse_url("rediss://u:s3cret@h/3?socket_timeout=2&ssl_cert_reqs=none") == "rediss://h:6379/3"
    for bad in ("redis://", "redis:///0", "redis://h/x", "redis://h:port/0", "redis://:s3cret@h/0?bogus=1",
                "redis://h/0?ssl_cert_reqs=none", "sqlite3:///x.db"):
        with pytest.raises(QuietError) as info:
            RedisEngine(bad)
        assert info.value.exitcode == 3 and "s3cret" not in str(info.value)
    with pytest.raises(QuietError) as info:
        open_engine("redis://h:99999999/0")
    assert info.value.exitcode == 3


def test_redis_unreachable_is_one_line_meta_error():
    from servers import free_port

    e = open_engine(f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    t0 = time.monotonic()
    try:
        for call in (e.load, lambda: e.getattr(ROOT_INODE), lambda: mkfile(e, ROOT_INODE, b"x")):
            with pytest.raises(MetaError) as info:
                call()
            msg = str(info.value)
            assert "\n" not in msg and "s3cret" not in msg and "refused" in msg, msg
    finally:
        e.close()
    assert time.monotonic() - t0 < 5


def test_redis_conflicts_are_retried_and_counted(engines, meta_url, monkeypatch):
    """Another client changes a watched key between the reads and EXEC: EXEC does
    nothing, the transaction runs again (counted) and succeeds; with no attempts
    left, MetaError and nothing of the operation is committed."""
    import redis as redislib

    from curvefs_py.meta import redis as rmod

    redis_only(meta_url)
    e = engines(init=True)
    other = redislib.Redis.from_url(meta_url)
    commit = rmod._Tx.commit
    interfere = {"n": 0}

    def racing_commit(tx):
        if interfere["n"] and tx.watched:
            interfere["n"] -= 1
            other.set(b"i1", other.get(b"i1"))  # same bytes: still a change to WATCH
        return commit(tx)

    monkeypatch.setattr(rmod._Tx, "commit", racing_commit)
    try:
        before = metrics.get("meta_txn_retries")
        interfere["n"] = 3
        f = mkfile(e, ROOT_INODE, b"after-conflicts")
        assert metrics.get("meta_txn_retries") == before + 3
        assert e.lookup(ROOT_INODE, b"after-conflicts").ino == f
        monkeypatch.setattr(rmod, "MAX_ATTEMPTS", 2)
        interfere["n"] = 2
        with pytest.raises(MetaError) as info:
            mkfile(e, ROOT_INODE, b"never")
        assert "conflicts" in str(info.value)
        with raises_errno(errno.ENOENT):
            e.lookup(ROOT_INODE, b"never")
        assert e.usage().used_inodes == 2 and e.getattr(ROOT_INODE).nlink == 2
        g = mkfile(e, ROOT_INODE, b"later")
        assert g not in (f, ROOT_INODE)
        check_tree(e)
    finally:
        other.close()


def test_redis_server_restart_keeps_committed_state(tmp_path, caplog):
    """kill -9 of the server: everything committed is in the fsynced AOF; the engine's
    pooled connections are replaced after the restart.  A server that does not persist
    gets a warning at format time."""
    srv = servers.start_redis(tmp_path)
    e = open_engine(srv.url(0))
    try:
        e.init(make_format())
        e.new_session({"host": "h"})
        st = Store(e)
        f = mkfile(e, ROOT_INODE, b"f")
        st.write(f, 0, b"durable" * 100)
        e.setxattr(f, b"user.k", b"v")
        srv.kill()
        with pytest.raises(MetaError):
            e.getattr(f)
        srv.restart()
        assert e.getxattr(f, b"user.k") == b"v"
        assert st.read(f) == b"durable" * 100
        assert [s["sid"] for s in e.list_sessions()] == [e.sid]
        assert e.next_slice_id() > max(st.objects)
        e.close_session()
        r = __import__("redis").Redis(host=srv.host, port=srv.port)
        r.config_set("appendonly", "no")
        r.close()
        caplog.set_level(logging.WARNING, logger="curvefs_py")
        open_engine(srv.url(1)).init(make_format())
        assert any("appendonly no" in r.getMessage() for r in caplog.records)
    finally:
        e.close()
        srv.stop()
