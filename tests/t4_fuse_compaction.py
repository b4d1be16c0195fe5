"""Compaction through a real mount: fragmented chunks are rewritten, data never changes."""
from __future__ import annotations

import mmap
import os
import random
import time

import volinspect


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


def fragmented_file(f: str) -> bytearray:
    """A 1 MiB file of 41 slices (a mount with --compact-threshold 0 leaves them)."""
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
    return ref


def compact_on(a, f: str, ref: bytes, others=()) -> None:
    """Start ``a`` with compaction on, read ``f`` there (its daemon sees the long slice
    list and compacts), and wait for the compaction and for each other mount's note."""
    a.options = ["--compact-threshold", "8"]
    a.start()
    notes = [o.stats().get("vfs_remote_changes", 0) for o in others]
    with open(f, "rb") as fh:
        assert fh.read() == ref
    deadline = time.monotonic() + 10
    while a.stats().get("compact_chunks", 0) == 0:
        assert time.monotonic() < deadline, "no compaction"
        time.sleep(0.1)
    for o, n in zip(others, notes):
        while o.stats().get("vfs_remote_changes", 0) == n:
            assert time.monotonic() < deadline, "no change note"
            time.sleep(0.1)


def test_compaction_keeps_the_files_caches(mounts):
    """A compaction changes where the bytes live, not the bytes: the file keeps its
    times and data version, so the pages (or passthrough image) of it that another
    client holds stay valid, and its reopen there reads them without its daemon."""
    meta = mounts.format("file")
    a = mounts.mount(meta, "--compact-threshold", "0")
    f = os.path.join(a.path, "frag")
    ref = fragmented_file(f)
    a.stop()
    b = mounts.mount(meta, "--compact-threshold", "0")
    fb = os.path.join(b.path, "frag")
    for _ in range(2):  # read, then reopened: B's kernel (or image) holds the file
        with open(fb, "rb") as fh:
            assert fh.read() == ref
    before = os.stat(fb)

    compact_on(a, f, ref, [b])
    time.sleep(1.1)  # past B's attr timeout
    after = os.stat(fb)
    assert (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == \
        (before.st_mtime_ns, before.st_ctime_ns, before.st_size)
    reads = b.stats().get("fuse_op_read_count", 0)
    with open(fb, "rb") as fh:
        assert fh.read() == ref
    st = b.stats()
    assert st.get("fuse_op_read_count", 0) == reads, ("B's reopen went to its daemon", {
        k: v for k, v in st.items() if k.startswith(("passthrough_", "vfs_open_stale", "kernel_invalidate"))})
    b.stop()
    b.cache_dir += "-cold"
    b.start()  # what the metadata says now, from the object store
    with open(fb, "rb") as fh:
        assert fh.read() == ref


def direct_pread(fd: int, off: int, n: int) -> bytes:
    buf = mmap.mmap(-1, n)  # page-aligned, as O_DIRECT wants
    got = os.preadv(fd, [buf], off)
    return bytes(buf[:got])


def test_an_open_reader_elsewhere_reads_on_through_a_compaction(mounts):
    """B has the file open (its slice list cached, few blocks fetched) while A compacts
    it and deletes the old slices' objects: B's next READs find the new slice (the note
    dropped B's list), not a missing object (that would be damage: failsafe)."""
    meta = mounts.format("file")
    a = mounts.mount(meta, "--compact-threshold", "0")
    f = os.path.join(a.path, "frag")
    ref = fragmented_file(f)
    a.stop()
    # no pushing, no images, O_DIRECT: B's daemon fetches only the blocks asked for
    b = mounts.mount(meta, "--compact-threshold", "0", "--no-passthrough", "--kernel-cache-budget", "0")
    fd = os.open(os.path.join(b.path, "frag"), os.O_RDONLY | os.O_DIRECT)
    try:
        assert direct_pread(fd, 0, 4096) == ref[:4096]
        compact_on(a, f, ref, [b])
        deadline = time.monotonic() + 10
        while volinspect.object_keys(meta) != volinspect.live_keys(meta):  # old objects gone
            assert time.monotonic() < deadline, "the hidden slices were not deleted"
            time.sleep(0.1)
        for off in range(0, len(ref), 64 << 10):
            assert direct_pread(fd, off, 64 << 10) == ref[off:off + (64 << 10)], off
    finally:
        os.close(fd)
    assert b.stats().get("vfs_stale_slice_retries", 0) == 0
    with open(os.path.join(b.path, "still-writable"), "wb") as fh:  # not in failsafe
        fh.write(b"ok")
