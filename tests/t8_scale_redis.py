"""Volumes whose metadata lives in Redis (``redis://``), through real mounts.

The session redis-server (conftest ``redis_server``: AOF, ``appendfsync always``)
gives every test its own empty database.  The workload runs with ``os.*`` calls
only; a remount with a fresh cache directory must show the same tree and bytes,
so everything it reads came from Redis and the object store.  Two mounts of one
volume check close-to-open sharing; a ``kill -9`` of a dedicated server checks
that what was fsynced survives it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import stat

import pytest

import servers
from mounthelper import cli


def snapshot(root: str) -> dict[str, tuple]:
    """{relative path: (kind, bytes or target or entries, mode bits, nlink)} of a tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path), 0, st.st_nlink)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", sorted(os.listdir(path)), stat.S_IMODE(st.st_mode), st.st_nlink)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read(), stat.S_IMODE(st.st_mode), st.st_nlink)
    return out


def workload(root: str, seed: int = 0) -> None:
    """mkdir, write, overwrite, append, truncate, rename (also over a file and of a
    directory), link, symlink, xattr, chmod, unlink (also while open), rmdir."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "a", "b"))
    os.mkdir(os.path.join(root, "d"), 0o750)
    files = {}
    for i in range(30):
        rel = os.path.join(rng.choice(["", "a", "a/b", "d"]), f"f{i}")
        files[rel] = rng.randbytes(rng.choice([0, 1, 100, 4096, 70000]))
        with open(os.path.join(root, rel), "wb") as f:
            f.write(files[rel])
    for rel, data in files.items():
        with open(os.path.join(root, rel), "rb") as f:
            assert f.read() == data, rel
    big = os.path.join(root, "big")
    with open(big, "wb") as f:
        f.write(b"x" * 300000)
        f.flush()
        os.fsync(f.fileno())
    with open(big, "r+b") as f:
        f.seek(1000)
        f.write(b"y" * 5000)
    with open(big, "ab") as f:
        f.write(b"z" * 10)
    os.truncate(big, 200000)
    with open(big, "rb") as f:
        assert f.read() == b"x" * 1000 + b"y" * 5000 + b"x" * 194000
    os.rename(big, os.path.join(root, "renamed"))
    for rel in list(files)[:5]:
        os.rename(os.path.join(root, rel), os.path.join(root, "d", "moved-" + os.path.basename(rel)))
    os.rename(os.path.join(root, "d", "moved-" + os.path.basename(list(files)[0])),
              os.path.join(root, "renamed"))  # over an existing file
    os.rename(os.path.join(root, "a", "b"), os.path.join(root, "d", "b2"))
    with pytest.raises(OSError) as ei:
        os.rename(os.path.join(root, "d"), os.path.join(root, "d", "b2", "inside"))
    assert ei.value.errno == errno.EINVAL
    os.link(os.path.join(root, "renamed"), os.path.join(root, "a", "hard"))
    os.symlink("../renamed", os.path.join(root, "a", "sym"))
    with open(os.path.join(root, "a", "sym"), "rb") as f, open(os.path.join(root, "renamed"), "rb") as g:
        assert f.read() == g.read()
    os.setxattr(os.path.join(root, "a", "hard"), "user.k", b"v")
    os.chmod(os.path.join(root, "a", "hard"), 0o600)
    for rel in list(files)[10:20]:
        for d in ("", "a", "d", "d/b2"):
            p = os.path.join(root, d, os.path.basename(rel))
            if os.path.exists(p):
                os.unlink(p)
    os.mkdir(os.path.join(root, "empty"))
    os.rmdir(os.path.join(root, "empty"))
    with pytest.raises(OSError) as ei:
        os.rmdir(os.path.join(root, "d"))
    assert ei.value.errno == errno.ENOTEMPTY
    fd = os.open(os.path.join(root, "a", "gone"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"still here")
    os.unlink(os.path.join(root, "a", "gone"))
    assert os.pread(fd, 100, 0) == b"still here"
    os.close(fd)


def used_inodes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_files - st.f_ffree


@pytest.mark.parametrize("storage", ["file", "s3"])
def test_posix_workload_survives_remount(mounts, redis_server, storage):
    meta = mounts.format(storage, meta=servers.redis_new_db(redis_server))
    assert meta.startswith("redis://")
    m = mounts.mount(meta)
    workload(m.path)
    before = snapshot(m.path)
    assert before["renamed"][3] == 2 and before["d"][3] == 3  # a hard link; d holds b2
    inodes = used_inodes(m.path)
    m.stop()
    m2 = mounts.mount(meta)  # a new mountpoint and an empty cache directory
    assert snapshot(m2.path) == before
    assert used_inodes(m2.path) == inodes
    assert os.getxattr(os.path.join(m2.path, "a", "hard"), "user.k") == b"v"
    workload(os.path.join(m2.path, "d", "b2"), seed=1)  # and it keeps working
    assert snapshot(m2.path)["d/b2/renamed"][0] == "file"
    m2.stop()
    from curvefs_py.meta import open_engine

    e = open_engine(meta)
    try:
        assert e.list_sessions() == []  # every mount closed its session
    finally:
        e.close()


def test_two_mounts_share_a_volume(mounts, redis_server):
    """Two clients of one Redis volume: close-to-open, renames seen by both, and
    creations racing in one directory (WATCH conflicts between two processes)."""
    meta = mounts.format("file", meta=servers.redis_new_db(redis_server))
    a, b = mounts.mount(meta), mounts.mount(meta)
    with open(os.path.join(a.path, "from-a"), "wb") as f:
        f.write(b"written on a")
    with open(os.path.join(b.path, "from-a"), "rb") as f:
        assert f.read() == b"written on a"
    os.mkdir(os.path.join(b.path, "dir-b"))
    os.rename(os.path.join(b.path, "from-a"), os.path.join(b.path, "dir-b", "moved"))
    with open(os.path.join(a.path, "dir-b", "moved"), "rb") as f:
        assert f.read() == b"written on a"
    with pytest.raises(FileExistsError):
        os.mkdir(os.path.join(a.path, "dir-b"))
    import threading

    def create(m, tag):
        for i in range(60):
            with open(os.path.join(m.path, "dir-b", f"{tag}-{i}"), "wb") as f:
                f.write(b"%d" % i)

    threads = [threading.Thread(target=create, args=(m, tag)) for m, tag in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    names = sorted(os.listdir(os.path.join(a.path, "dir-b")))
    assert len(names) == 121 and names == sorted(os.listdir(os.path.join(b.path, "dir-b")))
    with open(os.path.join(a.path, "dir-b", "b-59"), "rb") as f:
        assert f.read() == b"59"


@contextlib.contextmanager
def own_redis(mounts, tmp_path):
    """A redis-server of the test's own (the test kills it) and a volume mounted on
    it: ``(server, META_URL, mount)``. The outage's warnings are expected: heartbeat,
    change feed (publisher, follower) and calls that meet it say so and carry on."""
    srv = servers.start_redis(tmp_path / "srv")
    try:
        meta = mounts.format("file", meta=srv.url(0))
        mounts.allow_log += [srv.url(0), "publishing", "change feed failed", "127.0.0.1:"]
        yield srv, meta, mounts.mount(meta)
    finally:
        srv.stop()


def test_fsynced_data_survives_a_redis_crash(mounts, tmp_path):
    """kill -9 of the redis-server under a mount: what was fsynced before is there
    after the restart (AOF, appendfsync always), and the mount carries on."""
    with own_redis(mounts, tmp_path) as (srv, meta, m):
        path = os.path.join(m.path, "f")
        with open(path, "wb") as f:
            f.write(b"fsynced" * 1000)
            os.fsync(f.fileno())
        os.mkdir(os.path.join(m.path, "dir"))
        srv.kill()
        srv.restart()
        with open(os.path.join(m.path, "dir", "after"), "wb") as f:
            f.write(b"after the restart")
        m.stop()
        m2 = mounts.mount(meta)
        with open(os.path.join(m2.path, "f"), "rb") as f:
            assert f.read() == b"fsynced" * 1000
        with open(os.path.join(m2.path, "dir", "after"), "rb") as f:
            assert f.read() == b"after the restart"
        m2.stop()


def test_metadata_outage_is_eio_and_the_mount_carries_on(mounts, tmp_path):
    """With the redis-server down, calls that need metadata fail with EIO, and a
    RELEASE that cannot reach it fails quietly: neither ends the mount (a MetaError
    once carried its message as its errno, and the FUSE adapter's TypeError for it
    took the daemon down: ENOTCONN). Once the server is back the same mount works,
    and unmounting during an outage exits 0 without a traceback."""
    with own_redis(mounts, tmp_path) as (srv, meta, m):
        path = os.path.join(m.path, "f")
        with open(path, "wb") as f:
            f.write(b"before")
        gone = os.path.join(m.path, "gone")
        with open(gone, "wb") as f:
            f.write(b"open and unlinked")
        fd = os.open(gone, os.O_RDONLY)
        os.unlink(gone)  # its last close has work in the metadata
        srv.kill()
        with pytest.raises(OSError) as e:
            os.mkdir(os.path.join(m.path, "during"))
        assert e.value.errno == errno.EIO
        os.close(fd)  # its RELEASE (release_sustained) meets the outage
        srv.restart()
        os.mkdir(os.path.join(m.path, "after"))
        with open(path, "rb") as f:
            assert f.read() == b"before"
        assert sorted(os.listdir(m.path)) == ["after", "f"]
        srv.kill()  # and an unmount during an outage: a clean exit, warnings only
        proc = m.proc
        m.stop()
        assert proc.returncode == 0
        srv.restart()
        m2 = mounts.mount(meta)
        assert sorted(os.listdir(m2.path)) == ["after", "f"]


def test_cli_errors_for_redis_urls(redis_server, tmp_path):
    """format/mount with a bad URL, an unreachable server or an unformatted
    database: one line on stderr and the documented exit code."""
    bucket = ["--storage", "file", "--bucket", str(tmp_path / "objects")]
    for url, code, words in [
        (f"redis://:s3cret@127.0.0.1:{servers.free_port()}/0", 4, "refused"),
        ("redis://127.0.0.1:1/x", 3, "database number"),
        ("redis://127.0.0.1/0?bogus=1", 3, "bogus"),
    ]:
        r = cli("format", url, "vol", *bucket, check=False)
        assert r.returncode == code, r.stderr
        assert words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    empty = servers.redis_new_db(redis_server)
    os.mkdir(tmp_path / "mnt")
    r = cli("mount", empty, str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache"), check=False)
    assert r.returncode == 5 and "format" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("format", empty, "vol", *bucket)
    assert "formatted" in r.stdout
    r = cli("format", empty, "vol", *bucket, check=False)
    assert r.returncode == 5 and len(r.stderr.strip().splitlines()) == 1, r.stderr
