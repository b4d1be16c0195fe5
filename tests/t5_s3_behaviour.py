"""Object-storage behaviour seen through a mount: outages, the block cache, background deletes.

* An S3 outage (server frozen with SIGSTOP) during a read of uncached data ends in EIO for
  the caller after the retries, within a bounded time (``--io-timeout``), and never hangs;
  after the server resumes, everything committed reads back intact, and a write whose
  upload failed during the outage is uploaded by the next fsync.
* A block fetched from S3 once is served locally afterwards: re-reads after
  ``posix_fadvise(DONTNEED)`` and after a remount with the same ``--cache-dir`` issue no
  object GET (``object_get_count`` in ``.stats``).
* Objects that no longer show through (overwrite, truncate, unlink) are deleted in the
  background: the bucket returns to exactly the objects the metadata names.
* An unlinked file that is still open keeps its objects until the last close.

Object counts are read from the bucket itself (``volinspect``), not from the daemon.
"""
from __future__ import annotations

import errno
import os
import random
import threading
import time
import uuid

import pytest

import servers
import volinspect
from mounthelper import cli, read_cold

MiB = 1 << 20
IO_TIMEOUT = 3.0  # --io-timeout of the outage mounts
EIO_WITHIN = 20.0  # the caller must have its EIO within this many seconds


def data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_file(path: str, content: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(content)
        os.fsync(f.fileno())


def wait_for(cond, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def in_thread(fn, timeout: float):
    """Run fn() in a thread; (result or exception, seconds), or None if still running."""
    box = {}

    def run():
        t0 = time.monotonic()
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            box["result"] = exc
        box["took"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return t, box


# --------------------------------------------------------------------------- outages
@pytest.fixture(scope="module")
def own_s3(tmp_path_factory):
    """A server of our own: freezing it must not stall other tests' mounts."""
    srv = servers.start_s3_server(tmp_path_factory.mktemp("s3-outage"))
    yield srv
    srv.stop()


def format_on(mounts, srv) -> str:
    meta = f"sqlite3://{mounts.tmp}/outage-{uuid.uuid4().hex[:6]}.db"
    bucket = srv.create_bucket(f"b{uuid.uuid4().hex[:12]}")
    cli("format", meta, "vol", "--storage", "s3", "--bucket", bucket,
        "--access-key", srv.access_key, "--secret-key", srv.secret_key)
    return meta


def test_outage_read_gets_eio_then_recovers(mounts, own_s3):
    mounts.allow_log += ["unreachable", "into the outage"]
    meta = format_on(mounts, own_s3)
    m = mounts.mount(meta, "--io-timeout", str(IO_TIMEOUT))
    content = data(1, 9 * MiB)  # three blocks
    f = os.path.join(m.path, "f")
    write_file(f, content)
    m.stop()
    m.cache_dir += "-cold"  # nothing of f is cached now
    m.start()

    fd = os.open(f, os.O_RDONLY)
    try:
        with own_s3.outage():
            t, box = in_thread(lambda: os.pread(fd, MiB, 4 * MiB), EIO_WITHIN + 30)
            hung = t.is_alive()
        if hung:  # resumed: let the reader finish before failing
            t.join(60)
        assert not hung, "a read during an S3 outage hangs"
        err = box["result"]
        assert isinstance(err, OSError) and err.errno == errno.EIO, err
        assert box["took"] < EIO_WITHIN, f"EIO after {box['took']:.1f}s"
        assert box["took"] >= IO_TIMEOUT * 0.8, f"gave up after {box['took']:.1f}s: no retries?"
        print(f"\nread during an outage: EIO after {box['took']:.1f}s (--io-timeout {IO_TIMEOUT})")
        # the server is back: the same descriptor reads the committed data
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, MiB, 4 * MiB) == content[4 * MiB:5 * MiB]
    finally:
        os.close(fd)
    assert read_cold(f) == content
    stats = m.stats()
    assert stats.get("object_errors", 0) >= 1


def test_outage_write_fails_then_fsync_uploads(mounts, own_s3):
    mounts.allow_log += ["unreachable", "into the outage", "upload of slice", "upload failed"]
    meta = format_on(mounts, own_s3)
    m = mounts.mount(meta, "--io-timeout", str(IO_TIMEOUT))
    kept = data(2, 5 * MiB)
    write_file(os.path.join(m.path, "kept"), kept)
    new = data(3, 6 * MiB)
    fd = os.open(os.path.join(m.path, "new"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        with own_s3.outage():
            os.write(fd, new)
            t, box = in_thread(lambda: os.fsync(fd), EIO_WITHIN + 30)
            hung = t.is_alive()
        if hung:
            t.join(60)
        assert not hung, "fsync during an S3 outage hangs"
        err = box["result"]
        assert isinstance(err, OSError) and err.errno == errno.EIO, err
        assert box["took"] < EIO_WITHIN, f"EIO after {box['took']:.1f}s"
        # after the outage the buffered blocks are uploaded by the next fsync
        os.fsync(fd)
    finally:
        os.close(fd)
    assert not volinspect.dangling_keys(meta)
    m.stop()
    m.cache_dir += "-cold"
    m.start()
    assert read_cold(os.path.join(m.path, "kept")) == kept
    assert read_cold(os.path.join(m.path, "new")) == new


# ------------------------------------------------------------------------ block cache
def test_fetched_blocks_are_served_locally(mounts):
    meta = mounts.format("s3")
    # no passthrough images: this is the block cache's test, and an image held from the
    # last mount would answer the read after the remount without asking the block cache
    m = mounts.mount(meta, "--no-passthrough")
    content = data(4, 10 * MiB)
    f = os.path.join(m.path, "f")
    write_file(f, content)
    m.stop()
    m.cache_dir += "-cold"
    m.start()

    def gets():
        return m.stats().get("object_get_count", 0)

    g0 = gets()
    assert read_cold(f) == content
    g1 = gets()
    assert g1 - g0 >= 3, f"{g1 - g0} GETs for three uncached blocks"
    for _ in range(2):
        assert read_cold(f) == content  # pages dropped: the daemon answers from its cache
    assert gets() == g1, "a re-read went to S3"

    # a new daemon with the same --cache-dir reads from the disk cache
    m.stop()
    m.start()
    g2 = gets()
    assert read_cold(f) == content
    stats = m.stats()
    assert stats.get("object_get_count", 0) == g2, "a read after remount went to S3"
    # each of the 3 blocks came off the disk cache (no GET, asserted above, and the memory
    # cache is new): read by the reader (a disk hit), by the sequential prefetcher ahead of
    # it (then the reader hits memory), or pushed into the page cache on open (then the
    # kernel answers; a push of the 2 MiB tail counts as its block)
    pushed_blocks = -(-stats.get("pusher_pushed_bytes", 0) // (4 * MiB))
    from_disk = (stats.get("cache_disk_hits", 0) + stats.get("chunk_prefetch_blocks", 0)
                 + pushed_blocks)
    assert from_disk >= 3, stats


# ---------------------------------------------------------------- background deletes
def chunk_objects(meta):
    return volinspect.object_keys(meta)


def settled(meta):
    """True once the bucket holds exactly the objects the metadata names."""
    return chunk_objects(meta) == volinspect.live_keys(meta)


@pytest.mark.parametrize("store", ["file", "s3"])
def test_hidden_objects_are_deleted(mounts, store):
    meta = mounts.format(store)
    m = mounts.mount(meta)
    f = os.path.join(m.path, "f")
    write_file(f, data(5, 8 * MiB + 10))  # blocks 4M, 4M, 10 bytes
    assert len(chunk_objects(meta)) == 3 and settled(meta)

    # overwrite in place, fully: the old slice shows nowhere any more
    write_file(f, data(6, 8 * MiB + 10), "r+b")
    wait_for(lambda: settled(meta), 15, "old objects to be deleted after an overwrite")
    assert len(chunk_objects(meta)) == 3
    assert read_cold(f) == data(6, 8 * MiB + 10)

    # a partial overwrite keeps both slices (each shows somewhere)
    with open(f, "r+b") as fh:
        fh.seek(MiB)
        fh.write(b"x" * MiB)
    wait_for(lambda: settled(meta), 15, "the bucket to settle")
    assert len(chunk_objects(meta)) == 4

    # O_TRUNC rewrite, truncate down, unlink
    write_file(f, data(7, 3 * MiB))
    wait_for(lambda: settled(meta) and len(chunk_objects(meta)) == 1, 15, "objects of a truncated file")
    os.truncate(f, 0)
    wait_for(lambda: not chunk_objects(meta), 15, "objects of a file truncated to 0")
    write_file(f, data(8, 5 * MiB))
    os.unlink(f)
    wait_for(lambda: not chunk_objects(meta), 15, "objects of an unlinked file")
    # objects go first, then their delslices rows
    wait_for(lambda: not volinspect.queued_keys(meta), 15, "the delete queue to drain")


@pytest.mark.parametrize("store", ["file", "s3"])
def test_unlinked_open_file_keeps_objects_until_close(mounts, store):
    meta = mounts.format(store)
    m = mounts.mount(meta)
    f = os.path.join(m.path, "f")
    content = data(9, 9 * MiB)
    write_file(f, content)
    objects = chunk_objects(meta)
    assert len(objects) == 3
    fd = os.open(f, os.O_RDONLY)
    try:
        os.unlink(f)
        assert not os.path.exists(f)
        time.sleep(2.5)  # the deleter runs every second
        assert chunk_objects(meta) == objects, "objects of an open file were deleted"
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 9 * MiB, 0) == content
    finally:
        os.close(fd)
    wait_for(lambda: not chunk_objects(meta), 15, "objects to be deleted after the last close")
