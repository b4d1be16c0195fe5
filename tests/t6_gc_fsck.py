"""``curvefs gc`` and ``curvefs fsck`` on real volumes (files written through a mount).

Leaks and damage are made the way they happen: leaks by a crash between upload and commit
(also in ``t6_crash``), here planted as objects in the bucket; damage by removing or
shortening a block object in the bucket.  Other clients are simulated through the bucket
and the metadata engine (STYLE §6.3 rule 9).
"""
from __future__ import annotations

import json
import os
import random
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

    r = gc(meta)
    assert (r["named"], r["leaked"], r["leaked_bytes"], r["young"], r["foreign"], r["deleted"]) == \
        (len(named), 1, 100, 1, 1, 0)
    assert r["broken_files"] == 0
    text = cli("gc", meta).stdout
    assert "leaked              1 (100.0 B)" in text and "--delete" in text
    assert volinspect.object_keys(meta) == named | {old, young, "chunks/README"}  # report only

    r = gc(meta, "--delete")
    assert (r["deleted"], r["deleted_bytes"], r["kept"]) == (1, 100, 0)
    assert volinspect.object_keys(meta) == named | {young, "chunks/README"}
    # with no age limit the young leak goes too; a second run finds nothing
    assert gc(meta, "--delete", "--min-age", "0")["deleted"] == 1
    assert gc(meta, "--min-age", "0")["leaked"] == 0
    assert volinspect.object_keys(meta) == named | {"chunks/README"}

    m.cache_dir += "-cold"
    m.start()
    for rel, content in want.items():
        assert read_cold(os.path.join(m.path, rel)) == content, rel
    assert fsck(meta)[0] == 0  # also while mounted


def test_gc_keeps_a_leak_whose_commit_arrives_meanwhile(mounts):
    """The upload-then-commit order seen by gc: an object no chunk names yet is a leak
    candidate; if its slice is committed before the deletes start, it is kept."""
    meta = mounts.format("file")
    engine = open_engine(meta)
    store = volinspect.open_volume_store(meta)
    try:
        fmt = engine.load()
        ino = engine.mknod(1, b"late", 0o100644, 0, 0).ino
        sid = engine.next_slice_id()
        key = block_key(sid, 0, 10)
        store.put(key, b"0123456789")
        backdate(meta, key, 60)
        a = audit(engine, store, fmt.block_size, min_age=30)
        assert [o.key for o in a.leaked] == [key]
        engine.write(ino, [(0, Slice(0, sid, 10, 0, 10))], 10, time.time_ns())  # the commit
        assert collect(engine, store, fmt.block_size, a.leaked) == (0, 0, 1)
        assert store.get(key) == b"0123456789"
        a = audit(engine, store, fmt.block_size, min_age=0)
        assert (a.leaked, a.broken, a.named, a.files) == ([], {}, 1, 1)
    finally:
        store.close()
        engine.close()


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
