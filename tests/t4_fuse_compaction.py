"""Compaction through a real mount: fragmented chunks are rewritten, data never changes."""
from __future__ import annotations

import os
import random
import time


def test_random_small_writes_get_compacted(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta, "--compact-threshold", "16")
    f = os.path.join(m.path, "rw")
    ref = bytearray(2 << 20)
    rnd = random.Random(3)
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, bytes(len(ref)), 0)
        for i in range(200):
            off = rnd.randrange(0, len(ref) - 4096)
            b = rnd.randbytes(rnd.choice([1, 100, 4096]))
            os.pwrite(fd, b, off)
            ref[off:off + len(b)] = b
            os.fsync(fd)  # one slice per write
            if i % 50 == 49:  # reads see the right bytes while compaction runs
                assert os.pread(fd, len(ref), 0) == ref
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while m.stats().get("compact_chunks", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    st = m.stats()
    assert st["compact_chunks"] >= 1
    assert st["compact_slices_replaced"] >= 16
    m.stop()
    m.start()  # cold: the page cache is gone, read what metadata says
    with open(f, "rb") as fh:
        assert fh.read() == ref


def test_compaction_never_covers_a_newer_write(mounts):
    """Two clients: A writes while B's reads trigger compaction of the same chunk."""
    meta = mounts.format("file")
    a = mounts.mount(meta, "--compact-threshold", "8")
    b = mounts.mount(meta, "--compact-threshold", "8")
    fa, fb = os.path.join(a.path, "x"), os.path.join(b.path, "x")
    ref = bytearray(256 << 10)
    with open(fa, "wb") as fh:
        fh.write(ref)
    rnd = random.Random(5)
    for i in range(120):
        off = rnd.randrange(0, len(ref) - 512)
        blob = rnd.randbytes(512)
        ref[off:off + 512] = blob
        with open(fa, "r+b") as fh:  # one committed slice per close
            fh.seek(off)
            fh.write(blob)
        if i % 10 == 0:
            with open(fb, "rb") as fh:  # B reads: may compact under A's feet
                assert fh.read() == ref
    time.sleep(1)
    for path in (fa, fb):
        with open(path, "rb") as fh:
            assert fh.read() == ref


def test_compaction_keeps_the_files_caches(mounts):
    """A compaction changes where the bytes live, not the bytes: the file keeps its
    times and data version, so the pages (or passthrough image) of it that another
    client holds stay valid, and its reopen there reads them without its daemon."""
    meta = mounts.format("file")
    a = mounts.mount(meta, "--compact-threshold", "0")  # fragment the file first
    f = os.path.join(a.path, "frag")
    ref = bytearray(random.Random(7).randbytes(1 << 20))
    with open(f, "wb") as fh:
        fh.write(ref)
    rnd = random.Random(8)
    fd = os.open(f, os.O_RDWR)
    try:
        for _ in range(40):
            off = rnd.randrange(0, len(ref) - 100)
            b = rnd.randbytes(100)
            os.pwrite(fd, b, off)
            ref[off:off + 100] = b
            os.fsync(fd)  # one slice per write
    finally:
        os.close(fd)
    a.stop()
    b = mounts.mount(meta, "--compact-threshold", "0")
    fb = os.path.join(b.path, "frag")
    for _ in range(2):  # read, then reopened: B's kernel (or image) holds the file
        with open(fb, "rb") as fh:
            assert fh.read() == ref
    before = os.stat(fb)

    a.options = ["--compact-threshold", "8"]
    a.start()
    notes = b.stats().get("vfs_remote_changes", 0)
    with open(f, "rb") as fh:  # A's daemon reads 41 slices: compaction starts
        assert fh.read() == ref
    deadline = time.monotonic() + 10
    while a.stats().get("compact_chunks", 0) == 0:
        assert time.monotonic() < deadline, "no compaction"
        time.sleep(0.1)
    while b.stats().get("vfs_remote_changes", 0) == notes:  # B heard of it
        assert time.monotonic() < deadline, "no change note"
        time.sleep(0.1)
    time.sleep(1.1)  # past B's attr timeout
    after = os.stat(fb)
    assert (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == \
        (before.st_mtime_ns, before.st_ctime_ns, before.st_size)
    reads = b.stats().get("fuse_op_read_count", 0)
    with open(fb, "rb") as fh:
        assert fh.read() == ref
    assert b.stats().get("fuse_op_read_count", 0) == reads, "B's reopen went to its daemon"
    b.stop()
    b.cache_dir += "-cold"
    b.start()  # what the metadata says now, from the object store
    with open(fb, "rb") as fh:
        assert fh.read() == ref
