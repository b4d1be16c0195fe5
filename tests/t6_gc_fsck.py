"""``curvefs gc`` and ``curvefs fsck`` on real volumes (files written through a mount).

Leaks and damage are made the way they happen: leaks by a crash between upload and commit
(also in ``t6_crash``), here planted as objects in the bucket; damage by removing or
shortening a block object in the bucket.  Other clients are simulated through the bucket
and the metadata engine (STYLE §6.3 rule 9).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import time

import pytest

from curvefs_py.chunk.layout import block_key
from curvefs_py.maint.audit import audit, collect
from curvefs_py.meta import open_engine
from curvefs_py.types import Slice

from mounthelper import cli, read_cold
import volinspect

MiB = 1 << 20
#: far above any slice id these tests allocate
UNUSED_ID = 10 ** 9


def data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_files(m) -> dict[str, bytes]:
    want = {"a": data(1, 9 * MiB), "d/e/f": data(2, 9 * MiB), "g": data(3, 1000)}
    os.makedirs(os.path.join(m.path, "d/e"))
    for rel, content in want.items():
        with open(os.path.join(m.path, rel), "wb") as f:
            f.write(content)
    return want


def gc(meta: str, *args: str) -> dict:
    return json.loads(cli("gc", meta, "--json", *args).stdout)


def fsck(meta: str) -> tuple[int, dict, str]:
    r = cli("fsck", meta, "--json", check=False)
    text = cli("fsck", meta, check=False)
    assert r.returncode == text.returncode and not r.stderr and not text.stderr, (r.stderr, text.stderr)
    return r.returncode, json.loads(r.stdout), text.stdout


def backdate(meta: str, key: str, seconds: float) -> None:
    """Make a `file` store object look uploaded ``seconds`` ago."""
    path = os.path.join(volinspect.volume_format(meta)["bucket"], *key.split("/"))
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_gc_deletes_old_leaks_and_spares_young_ones(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta)
    want = write_files(m)
    m.stop()
    named = volinspect.live_keys(meta)
    store = volinspect.open_volume_store(meta)
    old, young = block_key(UNUSED_ID, 0, 100), block_key(UNUSED_ID + 1, 0, 5)
    store.put(old, b"o" * 100)
    store.put(young, b"y" * 5)
    store.put("chunks/README", b"not a block")
    backdate(meta, old, 2 * 3600)
    # the temporary files of two puts that never finished (a crash between write and rename)
    bucket = volinspect.volume_format(meta)["bucket"]
    crashed, inflight = (os.path.join(bucket, "chunks", "0", "0", n) for n in (".tmp-crashed", ".tmp-inflight"))
    for path, size in ((crashed, 50), (inflight, 3)):
        with open(path, "wb") as f:
            f.write(b"t" * size)
    backdate(meta, "chunks/0/0/.tmp-crashed", 2 * 3600)

    def partial_files():
        return {p for p in (crashed, inflight) if os.path.exists(p)}

    r = gc(meta)
    assert (r["named"], r["leaked"], r["leaked_bytes"], r["young"], r["foreign"], r["deleted"]) == \
        (len(named), 1, 100, 2, 1, 0)
    assert (r["partial"], r["partial_bytes"], r["broken_files"]) == (1, 50, 0)
    text = cli("gc", meta).stdout
    assert "leaked              1 (100.0 B)" in text and "unfinished uploads  1 (50.0 B" in text
    assert "--delete" in text
    assert volinspect.object_keys(meta) == named | {old, young, "chunks/README"}  # report only
    assert partial_files() == {crashed, inflight}

    r = gc(meta, "--delete")
    assert (r["deleted"], r["deleted_bytes"], r["kept"]) == (2, 150, 0)
    assert volinspect.object_keys(meta) == named | {young, "chunks/README"}
    assert partial_files() == {inflight}
    # with no age limit the young leak goes too, but not a temporary file of a put that
    # may still be running (10 minutes whatever --min-age says); a second run finds nothing
    assert gc(meta, "--delete", "--min-age", "0")["deleted"] == 1
    assert partial_files() == {inflight}
    backdate(meta, "chunks/0/0/.tmp-inflight", 601)
    assert gc(meta, "--delete", "--min-age", "0")["deleted"] == 1
    r = gc(meta, "--min-age", "0")
    assert (r["leaked"], r["partial"]) == (0, 0)
    assert volinspect.object_keys(meta) == named | {"chunks/README"} and not partial_files()

    m.cache_dir += "-cold"
    m.start()
    for rel, content in want.items():
        assert read_cold(os.path.join(m.path, rel)) == content, rel
    assert fsck(meta)[0] == 0  # also while mounted


@contextlib.contextmanager
def offline_volume(mounts):
    """A new volume's (meta URL, engine, store, Format), nothing mounted: the other
    clients of these tests are simulated through the engine and the bucket."""
    meta = mounts.format("file")
    engine = open_engine(meta)
    store = volinspect.open_volume_store(meta)
    try:
        yield meta, engine, store, engine.load()
    finally:
        store.close()
        engine.close()


def uploaded(meta, engine, store, content: bytes, age: float) -> Slice:
    """A new slice of ``content``, its object uploaded ``age`` seconds ago, not committed."""
    sid = engine.next_slice_id()
    store.put(block_key(sid, 0, len(content)), content)
    backdate(meta, block_key(sid, 0, len(content)), age)
    return Slice(0, sid, len(content), 0, len(content))


def test_gc_keeps_a_leak_whose_commit_arrives_meanwhile(mounts):
    """The upload-then-commit order seen by gc: an object no chunk names yet is a leak
    candidate; if its slice is committed before the deletes start, it is kept."""
    with offline_volume(mounts) as (meta, engine, store, fmt):
        ino = engine.mknod(1, b"late", 0o100644, 0, 0).ino
        late = uploaded(meta, engine, store, b"0123456789", 60)
        key = block_key(late.id, 0, 10)
        a = audit(engine, store, fmt.block_size, min_age=30)
        assert [o.key for o in a.leaked] == [key]
        engine.write(ino, [(0, late)], 10, time.time_ns())  # the commit
        assert collect(engine, store, fmt.block_size, a.leaked) == (0, 0, 1)
        assert store.get(key) == b"0123456789"
        a = audit(engine, store, fmt.block_size, min_age=0)
        assert (a.leaked, a.broken, a.named, a.files) == ([], {}, 1, 1)


def test_gc_leaves_the_delete_queue_to_the_clients(mounts):
    """Objects of slices in the delete queue are the mounted clients' to delete: gc
    neither counts them as leaks nor deletes them, also when a slice moves into the
    queue between the listing and the deletes."""
    with offline_volume(mounts) as (meta, engine, store, fmt):
        ino = engine.mknod(1, b"f", 0o100644, 0, 0).ino
        old, new = (uploaded(meta, engine, store, c, 7200) for c in (b"old", b"new"))
        engine.write(ino, [(0, old)], 3, time.time_ns())
        engine.write(ino, [(0, new)], 3, time.time_ns())  # hides old: queued
        assert dict(engine.pending_deletes()) == {old.id: 3}
        late = uploaded(meta, engine, store, b"late", 7200)  # not yet committed: a leak candidate
        a = audit(engine, store, fmt.block_size, min_age=60)
        assert (a.queued, a.queued_slices, [o.key for o in a.leaked]) == (1, 1, [block_key(late.id, 0, 4)])
        engine.write(ino, [(0, late)], 4, time.time_ns())  # its commit comes late...
        engine.write(ino, [(0, uploaded(meta, engine, store, b"last", 0))], 4, time.time_ns())  # ...hidden
        assert late.id in dict(engine.pending_deletes())
        assert collect(engine, store, fmt.block_size, a.leaked) == (0, 0, 1)
        for sl in (old, late):
            assert store.get(block_key(sl.id, 0, sl.size))  # still there for the deleters


WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, bytes(range(256)) * (6 << 12))  # 6 MiB: a full block uploaded, 2 MiB buffered
print("written", flush=True)
sys.stdin.readline()  # kept open, written no more, until told
os.write(fd, b"tail")
os.close(fd)
"""


def test_writes_of_a_file_kept_open_are_committed_so_gc_spares_them(mounts):
    """A file written and kept open: its uploaded block is committed within the flush
    interval, not at the close, so gc never finds it unnamed, however old it is."""
    meta = mounts.format("file")
    m = mounts.mount(meta, "--flush-interval", "1")
    path = os.path.join(m.path, "log")
    w = subprocess.Popen([sys.executable, "-c", WRITER, path], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline() == "written\n"
        ino = os.stat(path).st_ino
        deadline = time.monotonic() + 10
        while len(volinspect.file_keys(meta, ino)) < 2:  # the block and the 2 MiB rest
            assert time.monotonic() < deadline, "the writes of the open file were not committed"
            time.sleep(0.2)
        assert m.stats().get("vfs_idle_commits", 0) >= 1
        keys = volinspect.file_keys(meta, ino)
        for key in keys:
            backdate(meta, key, 2 * 3600)  # as if the file had been open for hours
        r = gc(meta, "--delete")
        assert (r["leaked"], r["deleted"], r["named"]) == (0, 0, 2), r
        w.stdin.write("\n")
        w.stdin.flush()
        assert w.wait(30) == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    m.cache_dir += "-cold"
    m.stop()
    m.start()
    assert read_cold(path) == bytes(range(256)) * (6 << 12) + b"tail"
    assert fsck(meta)[0] == 0


LOSER = r"""
import errno, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, b"x" * (12 << 20))  # more than the volume holds: its background commit fails
print("written", flush=True)
sys.stdin.readline()
try:
    os.close(fd)
except OSError as exc:
    print(errno.errorcode[exc.errno], flush=True)
else:
    print("ok", flush=True)
"""


def test_a_lost_background_commit_is_reported_at_the_writers_close(mounts):
    """ENOSPC in a commit that nobody waited for (the flush interval) is kept and
    returned by the close of the fd that wrote, not by a reader's close of the file."""
    meta = mounts.format("file", extra=("--capacity", "8M"))
    m = mounts.mount(meta, "--flush-interval", "1")
    mounts.allow_log += ["volume capacity exceeded"]
    path = os.path.join(m.path, "big")
    w = subprocess.Popen([sys.executable, "-c", LOSER, path], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline() == "written\n"
        deadline = time.monotonic() + 10
        while "were lost" not in open(m.log_file).read():
            assert time.monotonic() < deadline, "no background commit failed"
            time.sleep(0.2)
        with open(path, "rb") as f:  # a reader's open and close: no error for it
            f.read(1)
        w.stdin.write("\n")
        w.stdin.flush()
        assert w.stdout.readline() == "ENOSPC\n"
        assert w.wait(30) == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    with open(os.path.join(m.path, "small"), "wb") as f:  # the mount carries on
        f.write(b"fits")


def test_writes_a_readers_close_could_not_commit_are_reported_to_the_writer(mounts):
    """A reader's close commits the file's buffered writes; when that commit drops
    them (ENOSPC) the reader's close succeeds and the writer's close, which had
    returned 0 with its 2 MiB gone, fails with ENOSPC."""
    meta = mounts.format("file", extra=("--capacity", "1M"))
    m = mounts.mount(meta, "--flush-interval", "300")
    mounts.allow_log += ["volume capacity exceeded"]
    path = os.path.join(m.path, "f")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, b"x" * (2 << 20)) == 2 << 20  # buffered: it fits for now
        r = os.open(path, os.O_RDONLY)
        os.close(r)  # the commit it makes fails, but not for this reader
    finally:
        with pytest.raises(OSError) as e:
            os.close(fd)
    assert e.value.errno == errno.ENOSPC
    assert os.stat(path).st_size == 0
    with open(os.path.join(m.path, "small"), "wb") as f:  # the mount carries on
        f.write(b"fits")


def test_a_missing_object_is_eio_and_failsafe_after_fresh_retries(mounts):
    """A block object gone from the bucket (damage, not a stale slice list): the read
    is retried with fresh metadata a few times (a busy file can be rewritten between
    two of them), then fails with EIO and the mount refuses changes (EROFS)."""
    meta = mounts.format("file")
    m = mounts.mount(meta, "--no-passthrough")
    path = os.path.join(m.path, "f")
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    ino = os.stat(path).st_ino
    m.stop()
    store = volinspect.open_volume_store(meta)
    [key] = volinspect.file_keys(meta, ino)
    store.delete(key)
    store.close()
    mounts.allow_log += ["object missing", "not found in", "failsafe mode"]
    m.cache_dir += "-cold"
    m.start()
    with pytest.raises(OSError) as e:
        read_cold(path)
    assert e.value.errno == errno.EIO
    retries = m.stats().get("vfs_stale_slice_retries")
    assert retries and retries % 3 == 0  # 3 per READ (the kernel may send the read twice)
    with pytest.raises(OSError) as e:
        os.mkdir(os.path.join(m.path, "d"))
    assert e.value.errno == errno.EROFS


def test_writes_after_a_lost_background_commit_fail_at_once(mounts):
    """Once a background commit dropped a file's writes (ENOSPC), the next write()
    to it fails with ENOSPC too (as on JuiceFS), and so does the writer's close."""
    meta = mounts.format("file", extra=("--capacity", "1M"))
    m = mounts.mount(meta, "--flush-interval", "1")
    mounts.allow_log += ["volume capacity exceeded"]
    fd = os.open(os.path.join(m.path, "f"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * (2 << 20))
        deadline = time.monotonic() + 10
        while "were lost" not in open(m.log_file).read():
            assert time.monotonic() < deadline, "no background commit failed"
            time.sleep(0.2)
        with pytest.raises(OSError) as e:
            os.write(fd, b"more")
        assert e.value.errno == errno.ENOSPC
    finally:
        with pytest.raises(OSError) as e:
            os.close(fd)
    assert e.value.errno == errno.ENOSPC
    # the error was the closed writer's: a later writer of the file is not failed by it
    with open(os.path.join(m.path, "f"), "wb") as f:
        f.write(b"fits now")
    with open(os.path.join(m.path, "f"), "rb") as f:
        assert f.read() == b"fits now"


@pytest.mark.parametrize("storage", ["file", "s3"])
def test_fsck_names_the_files_that_miss_objects(mounts, storage):
    meta = mounts.format(storage)
    m = mounts.mount(meta)
    want = write_files(m)
    inos = {rel: os.stat(os.path.join(m.path, rel)).st_ino for rel in want}
    m.stop()
    rc, r, text = fsck(meta)
    assert (rc, r["broken"], r["files"], r["leaked"]) == (0, [], 3, 0), text
    assert "all present" in text

    store = volinspect.open_volume_store(meta)
    f_keys, g_keys = volinspect.file_keys(meta, inos["d/e/f"]), volinspect.file_keys(meta, inos["g"])
    assert len(f_keys) == 3 and len(g_keys) == 1
    lost = f_keys[1]
    saved = store.get(lost)
    store.delete(lost)
    store.put(g_keys[0], b"short")  # a shortened object (S3 cannot truncate: a new put)

    rc, r, text = fsck(meta)
    assert rc == 1, text
    got = {b["path"]: [(o["key"], o["problem"]) for o in b["objects"]] for b in r["broken"]}
    assert got == {"/d/e/f": [(lost, "missing")], "/g": [(g_keys[0], "5 bytes, not 1000")]}
    assert {b["inode"] for b in r["broken"]} == {inos["d/e/f"], inos["g"]}
    assert f"BROKEN /d/e/f (inode {inos['d/e/f']})" in text and "2 files miss data" in text
    # gc warns and deletes nothing a file names
    r = gc(meta, "--delete", "--min-age", "0")
    assert (r["broken_files"], r["broken_blocks"], r["deleted"]) == (2, 2, 0)

    store.put(lost, saved)
    store.put(g_keys[0], want["g"])
    store.close()
    assert fsck(meta)[0] == 0
    m.cache_dir += "-cold"
    m.start()
    for rel, content in want.items():
        assert read_cold(os.path.join(m.path, rel)) == content, rel
