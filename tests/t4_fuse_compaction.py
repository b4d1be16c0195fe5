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
