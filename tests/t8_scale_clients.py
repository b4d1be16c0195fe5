"""Several clients on one volume: close-to-open data, change-feed invalidation, races.

Each engine (SQLite shared by two daemons on one machine, Redis, PostgreSQL)
runs the same cases with 2–3 mounts whose attr/entry timeouts are 60 s: what
client A changes must be visible on B in well under a second, which only the
change feed (not the timeouts) can deliver.
"""
from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest

import servers
from mounthelper import cli

LONG = ("--attr-timeout", "60", "--entry-timeout", "60")


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def volume_args(request, tmp_path):
    """(storage, META_URL): SQLite with a local object dir shared by the daemons; the
    shared engines with data on the S3 server, as several machines would mount them."""
    if request.param == "sqlite":
        return "file", None  # mounts.format makes a new SQLite file
    if request.param == "redis":
        return "s3", servers.redis_new_db(request.getfixturevalue("redis_server"))
    return "s3", request.getfixturevalue("pg").new_database()


def eventually(fn, timeout=1.0, what=""):
    """Poll ``fn`` until it returns truthy; return the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            if fn():
                return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not visible within {timeout}s: {what}")
        time.sleep(0.02)


def test_changes_visible_on_other_client_within_a_second(mounts, volume_args):
    storage, meta_url = volume_args
    meta = mounts.format(storage, meta=meta_url)
    a = mounts.mount(meta, *LONG)
    b = mounts.mount(meta, *LONG)
    pa, pb = a.path, b.path
    # B looks at things first, so its kernel caches them for 60 s
    os.mkdir(os.path.join(pa, "d"))
    with open(os.path.join(pa, "d", "f"), "wb") as f:
        f.write(b"one")
    assert sorted(os.listdir(os.path.join(pb, "d"))) == ["f"]
    assert os.stat(os.path.join(pb, "d", "f")).st_size == 3
    assert not os.path.exists(os.path.join(pb, "d", "g"))  # a negative lookup
    # A changes: new entry, new size, mode, rename, unlink
    with open(os.path.join(pa, "d", "g"), "wb") as f:
        f.write(b"g")
    eventually(lambda: os.path.exists(os.path.join(pb, "d", "g")), what="new file")
    with open(os.path.join(pa, "d", "f"), "ab") as f:
        f.write(b"-two")
    eventually(lambda: os.stat(os.path.join(pb, "d", "f")).st_size == 7, what="new size")
    os.chmod(os.path.join(pa, "d", "f"), 0o600)
    eventually(lambda: os.stat(os.path.join(pb, "d", "f")).st_mode & 0o777 == 0o600, what="chmod")
    os.rename(os.path.join(pa, "d", "g"), os.path.join(pa, "d", "h"))
    eventually(lambda: not os.path.exists(os.path.join(pb, "d", "g"))
               and os.path.exists(os.path.join(pb, "d", "h")), what="rename")
    os.unlink(os.path.join(pa, "d", "h"))
    took = eventually(lambda: not os.path.exists(os.path.join(pb, "d", "h")), what="unlink")
    assert took < 1.0


def test_close_to_open_data(mounts, volume_args):
    storage, meta_url = volume_args
    meta = mounts.format(storage, meta=meta_url)
    a = mounts.mount(meta, *LONG)
    b = mounts.mount(meta, *LONG)
    fa, fb = os.path.join(a.path, "x"), os.path.join(b.path, "x")
    for i in range(5):
        data = bytes([i]) * (1 << 20)  # same size every time: only the data tells
        with open(fa, "wb") as f:
            f.write(data)
        with open(fb, "rb") as f:  # an open after the close sees the new bytes
            assert f.read() == data


def test_close_to_open_sizes_and_appends(mounts, volume_args):
    """An open right after a close elsewhere sees the new size, not the one B's kernel
    cached (60 s attr timeout, the change note still on its way): reads stopped at
    the old size, or read zeros past the new one, and an O_APPEND write landed at
    the old end, over the other client's bytes."""
    storage, meta_url = volume_args
    meta = mounts.format(storage, meta=meta_url)
    a = mounts.mount(meta, *LONG)
    b = mounts.mount(meta, *LONG)
    fa, fb = os.path.join(a.path, "s"), os.path.join(b.path, "s")
    for i, size in enumerate([100, 70000, 3 << 20, 1, 5000, 0, 20]):
        data = bytes([65 + i]) * size
        with open(fa, "wb") as f:
            f.write(data)
        with open(fb, "rb") as f:
            assert f.read() == data, (i, size)
        os.stat(fb)  # B's kernel caches this size for 60 s
    with open(fa, "ab") as f:
        f.write(b"a" * 10)
    fd = os.open(fb, os.O_WRONLY | os.O_APPEND)  # no lseek: the kernel's own offset
    try:
        os.write(fd, b"b" * 10)
    finally:
        os.close(fd)
    want = bytes([71]) * 20 + b"a" * 10 + b"b" * 10
    with open(fa, "rb") as f:
        assert f.read() == want
    with open(fb, "rb") as f:
        assert f.read() == want
    # attributes B's kernel took from a directory listing (readdirplus) count too
    os.listdir(b.path)
    with open(fa, "ab") as f:
        f.write(b"c" * 10)
    with open(fb, "rb") as f:
        assert f.read() == want + b"c" * 10
    # and this mount's own appends never make its next open expire them
    before = b.stats().get("vfs_open_stale_attrs", 0)
    for _ in range(10):
        with open(fb, "ab") as f:
            f.write(b"d")
    assert b.stats().get("vfs_open_stale_attrs", 0) == before
    with open(fb, "rb") as f:
        assert f.read() == want + b"c" * 10 + b"d" * 10


def test_mkdir_race_one_wins(mounts, volume_args):
    storage, meta_url = volume_args
    meta = mounts.format(storage, meta=meta_url)
    ms = [mounts.mount(meta, *LONG) for _ in range(3)]
    results = []

    def make(m):
        try:
            os.mkdir(os.path.join(m.path, "race"))
            results.append("ok")
        except OSError as exc:
            results.append(errno.errorcode[exc.errno])

    ts = [threading.Thread(target=make, args=(m,)) for m in ms]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(results) == ["EEXIST", "EEXIST", "ok"]


def test_writers_on_two_clients(mounts, volume_args):
    storage, meta_url = volume_args
    meta = mounts.format(storage, meta=meta_url)
    a = mounts.mount(meta, *LONG)
    b = mounts.mount(meta, *LONG)
    da, db = os.urandom(3 << 20), os.urandom(3 << 20)

    def write(path, data):
        with open(path, "wb") as f:
            for off in range(0, len(data), 65536):
                f.write(data[off:off + 65536])

    # different files at the same time
    ta = threading.Thread(target=write, args=(os.path.join(a.path, "fa"), da))
    tb = threading.Thread(target=write, args=(os.path.join(b.path, "fb"), db))
    ta.start(); tb.start(); ta.join(); tb.join()
    with open(os.path.join(b.path, "fa"), "rb") as f:
        assert f.read() == da
    with open(os.path.join(a.path, "fb"), "rb") as f:
        assert f.read() == db
    # the same file: the last close wins, and every block is one writer's whole
    write(os.path.join(a.path, "same"), da)
    write(os.path.join(b.path, "same"), db)
    for m in (a, b):
        with open(os.path.join(m.path, "same"), "rb") as f:
            assert f.read() == db


def test_status_shows_sessions(mounts, volume_args):
    from mounthelper import cli
    import json

    storage, meta_url = volume_args
    meta = mounts.format(storage, meta=meta_url)
    a = mounts.mount(meta)
    b = mounts.mount(meta)
    out = json.loads(cli("status", meta, "--json").stdout)
    mps = sorted(s["mountpoint"] for s in out["sessions"])
    assert mps == sorted([a.path, b.path])
    assert out["usage"]["used_inodes"] >= 1


def test_a_read_only_client_reads_and_changes_nothing(mounts):
    """``--read-only``: the volume's files read as the writer left them, every change
    is EROFS (the volume unchanged), and warmup and stats still work; the writing
    client's next close is seen there at the next open."""
    meta = mounts.format("file")
    rw = mounts.mount(meta)
    os.mkdir(os.path.join(rw.path, "d"))
    with open(os.path.join(rw.path, "d", "f"), "wb") as f:
        f.write(b"v1" * 100_000)
    ro = mounts.mount(meta, "--read-only")
    f = os.path.join(ro.path, "d", "f")
    with open(f, "rb") as fh:
        assert fh.read() == b"v1" * 100_000
    attempts = [lambda: open(f, "r+b"), lambda: open(os.path.join(ro.path, "new"), "wb"),
                lambda: os.mkdir(os.path.join(ro.path, "d2")), lambda: os.unlink(f),
                lambda: os.rename(f, f + "2"), lambda: os.chmod(f, 0o600), lambda: os.truncate(f, 0),
                lambda: os.setxattr(f, "user.k", b"v"), lambda: os.symlink("x", os.path.join(ro.path, "l")),
                lambda: os.link(f, os.path.join(ro.path, "h")), lambda: os.rmdir(os.path.join(ro.path, "d"))]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, (attempt, info.value)
    assert sorted(os.listdir(ro.path)) == ["d"] and os.stat(f).st_mode & 0o777 == 0o644
    cli("warmup", "-q", os.path.join(ro.path, "d"))
    assert json.loads(cli("stats", ro.path, "--json").stdout)["derived"] is not None
    with open(os.path.join(rw.path, "d", "f"), "wb") as fh:
        fh.write(b"v2")
    time.sleep(1.1)  # the read-only client's attr cache
    with open(f, "rb") as fh:
        assert fh.read() == b"v2"
