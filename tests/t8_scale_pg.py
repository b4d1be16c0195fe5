"""Volumes whose metadata lives in PostgreSQL (``postgres://``), through real mounts.

A session PostgreSQL cluster (conftest ``pg``) gives every test its own database.
The workload runs with ``os.*`` calls only; a remount with a fresh cache directory
must show the same tree and bytes, so everything it reads came from PostgreSQL and
the object store.  Two mounts of one volume check close-to-open sharing.
"""
from __future__ import annotations

import errno
import os
import random
import stat
import threading

import pytest

from mounthelper import cli


def snapshot(root: str) -> dict[str, tuple]:
    """{relative path: (kind, bytes or target, mode bits, nlink)} of a whole tree."""
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
    """Create, write, read, rename, link, truncate and unlink in a small tree."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "a", "b", "c"))
    os.mkdir(os.path.join(root, "d"), 0o750)
    files = {}
    for i in range(40):
        rel = os.path.join(rng.choice(["", "a", "a/b", "a/b/c", "d"]), f"f{i}")
        data = rng.randbytes(rng.choice([0, 1, 100, 4096, 70000]))
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        files[rel] = data
    for rel, data in files.items():
        with open(os.path.join(root, rel), "rb") as f:
            assert f.read() == data, rel
    # rewrite a middle range, append, truncate
    path = os.path.join(root, "big")
    with open(path, "wb") as f:
        f.write(b"x" * 300000)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"y" * 5000)
    with open(path, "ab") as f:
        f.write(b"z" * 10)
    os.truncate(path, 200000)
    with open(path, "rb") as f:
        assert f.read() == b"x" * 1000 + b"y" * 5000 + b"x" * 194000
    # renames: in place, across directories, over an existing file, a directory
    os.rename(path, os.path.join(root, "renamed"))
    for i in range(1, 6):
        for d in ("", "a", "a/b", "a/b/c", "d"):
            src = os.path.join(root, d, f"f{i}")
            if os.path.exists(src):
                os.rename(src, os.path.join(root, "d", f"moved{i}"))
    os.rename(os.path.join(root, "d", "moved1"), os.path.join(root, "renamed"))  # replaces it
    os.rename(os.path.join(root, "a", "b"), os.path.join(root, "d", "b2"))
    with pytest.raises(OSError) as ei:
        os.rename(os.path.join(root, "d"), os.path.join(root, "d", "b2", "inside"))
    assert ei.value.errno == errno.EINVAL
    # links, symlinks, unlink, rmdir
    os.link(os.path.join(root, "renamed"), os.path.join(root, "a", "hard"))
    os.symlink("../renamed", os.path.join(root, "a", "sym"))
    with open(os.path.join(root, "a", "sym"), "rb") as f:
        assert f.read() == open(os.path.join(root, "renamed"), "rb").read()
    for i in range(20, 30):
        for d in ("", "a", "d", "d/b2", "d/b2/c"):
            p = os.path.join(root, d, f"f{i}")
            if os.path.exists(p):
                os.unlink(p)
    os.mkdir(os.path.join(root, "empty"))
    os.rmdir(os.path.join(root, "empty"))
    with pytest.raises(OSError) as ei:
        os.rmdir(os.path.join(root, "d"))
    assert ei.value.errno == errno.ENOTEMPTY
    os.chmod(os.path.join(root, "a", "hard"), 0o600)
    # an open file survives its unlink until closed
    fd = os.open(os.path.join(root, "a", "gone"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"still here")
    os.unlink(os.path.join(root, "a", "gone"))
    assert os.pread(fd, 100, 0) == b"still here"
    os.close(fd)


@pytest.mark.parametrize("storage", ["file", "s3"])
def test_posix_workload_survives_remount(mounts, pg, storage):
    meta = mounts.format(storage, meta=pg.new_database())
    assert meta.startswith("postgres://")
    m = mounts.mount(meta)
    workload(m.path)
    before = snapshot(m.path)
    assert before["renamed"][3] == 2 and before["d"][3] == 3  # a hard link; d holds b2
    st = os.statvfs(m.path)
    m.stop()
    m2 = mounts.mount(meta)  # a new mountpoint and an empty cache directory
    assert snapshot(m2.path) == before
    assert os.statvfs(m2.path).f_files - os.statvfs(m2.path).f_ffree == st.f_files - st.f_ffree
    workload(os.path.join(m2.path, "d", "b2"), seed=1)  # and it keeps working
    assert snapshot(m2.path)["d/b2/renamed"][0] == "file"


def test_two_mounts_share_a_volume(mounts, pg):
    """Two clients of one PostgreSQL volume: close-to-open, and renames seen by both."""
    meta = mounts.format("file", meta=pg.new_database())
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
    # both create in one directory at the same time: every name exists once
    for i in range(50):
        for m in (a, b):
            with open(os.path.join(m.path, "dir-b", f"{m.path[-4:]}-{i}"), "wb") as f:
                f.write(b"%d" % i)
    assert len(os.listdir(os.path.join(a.path, "dir-b"))) == 101
    assert sorted(os.listdir(os.path.join(a.path, "dir-b"))) == sorted(os.listdir(os.path.join(b.path, "dir-b")))


def test_a_hung_postgres_is_eio_not_a_hang(mounts, pg):
    """A PostgreSQL that stops answering (SIGSTOP: the connections stay up) held a
    FUSE request, and the caller in D state, for the whole outage (libpq has no read
    timeout); the transaction deadline cuts the connection and the caller gets EIO,
    while the server is still stopped.  Once it answers again the mount carries on."""
    meta = mounts.format("file", meta=pg.new_database())
    m = mounts.mount(meta)
    mounts.allow_log += ["deadline", "postgres", "metadata", "failed", "EIO", "heartbeat"]
    with open(os.path.join(m.path, "before"), "wb") as f:
        f.write(b"before")
    outcome: list = []

    def mkdir():
        try:
            os.mkdir(os.path.join(m.path, "during"))
            outcome.append("ok")
        except OSError as exc:
            outcome.append(exc.errno)

    pg.pause()
    t = threading.Thread(target=mkdir)
    try:
        t.start()
        t.join(120)  # the deadline is 30 s; a hang lasts until the resume below
        answered_while_stopped = not t.is_alive()
    finally:
        pg.resume()
        t.join(60)
    assert answered_while_stopped, "the call waited for the server to come back"
    assert outcome == [errno.EIO]
    os.mkdir(os.path.join(m.path, "after"))
    with open(os.path.join(m.path, "before"), "rb") as f:
        assert f.read() == b"before"


def test_cli_errors_for_postgres_urls(pg, tmp_path):
    """format/mount on a bad server, password or database: one line and an exit code."""
    from servers import free_port

    bucket = ["--storage", "file", "--bucket", str(tmp_path / "objects")]
    for url, code, words in [
        (f"postgres://u:s3cret@127.0.0.1:{free_port()}/x", 4, "refused"),
        (pg.url_for(pg.dbname, password="s3cret"), 4, "password authentication failed"),
        ("postgres://u:s3cret@127.0.0.1:1/", 3, "database name"),
    ]:
        r = cli("format", url, "vol", *bucket, check=False)
        assert r.returncode == code, r.stderr
        assert words in r.stderr  # (cli/format.py echoes the META_URL, password included)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    missing = pg.url_for(f"unformatted_{os.getpid()}")
    os.mkdir(tmp_path / "mnt")
    r = cli("mount", missing, str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache"), check=False)
    assert r.returncode == 5 and "format" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("format", missing, "vol", *bucket)  # format creates the database
    assert "formatted" in r.stdout
