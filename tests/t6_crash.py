"""Crash tests: ``kill -9`` the daemon, then clear the dead mount, remount and compare.

What a crash may lose (DESIGN §3): writes that were neither fsynced nor closed.  What it
must never do: lose an fsynced or closed file, or leave metadata that names a missing
object (blocks are uploaded before their slice is committed).  The remount uses a fresh
``--cache-dir``, so every block is read from the object store, not from the dead daemon's
disk cache (which is written through on upload and could hide a missing object).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from mounthelper import cli, is_mounted, read_cold as read_all
import volinspect

MiB = 1 << 20


def kill_daemon(m) -> None:
    """kill -9 the daemon only: the mount stays in place, dead (ENOTCONN)."""
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(10)
    m.proc = None
    with pytest.raises(OSError) as ei:
        os.listdir(m.path)  # a request (a stat could be answered from the attr cache)
    assert ei.value.errno == errno.ENOTCONN, ei.value
    assert is_mounted(m.path)


def remount_cold(m) -> None:
    """Start the daemon again with an empty cache directory, also over a dead mount, and
    wait until the new daemon serves (its pid in ``.config``): with a dead mount in
    place ``Mount.start`` would see "mounted" at once, and its makedirs would fail."""
    m.cache_dir = m.cache_dir + "-after-crash"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "makedirs", lambda *a, **k: None)
        m.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            with open(os.path.join(m.path, ".config")) as f:
                if json.load(f)["pid"] == m.proc.pid:
                    return
        except OSError as exc:  # dead mount, or the bare directory before the new mount
            if exc.errno not in (errno.ENOTCONN, errno.ENOENT):
                raise
        assert m.proc.poll() is None, f"daemon exited {m.proc.returncode}: {m.proc.stderr.read()}"
        assert time.monotonic() < deadline, "daemon did not take over the dead mount"
        time.sleep(0.05)


def data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_durable(m) -> tuple[dict[str, bytes], list[int]]:
    """Files that must survive a crash; returns (relative path → bytes, fds still open)."""
    want: dict[str, bytes] = {}
    open_fds = []

    def put(rel, content, *, fsync=True, keep_open=False):
        path = os.path.join(m.path, rel)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        for off in range(0, len(content), MiB):
            os.write(fd, content[off:off + MiB])
        if fsync:
            os.fsync(fd)
        if keep_open:
            open_fds.append(fd)
        else:
            os.close(fd)
        want[rel] = content

    put("small", b"tiny but durable\n")
    put("multi-block", data(1, 9 * MiB + 123))  # three 4 MiB blocks, the last one short
    put("closed-not-fsynced", data(2, 5 * MiB))  # close = flush: durable too
    put("fsynced-still-open", data(3, 6 * MiB + 7), keep_open=True)
    os.makedirs(os.path.join(m.path, "d", "sub"))
    put("d/sub/nested", data(4, 4096))
    put("empty", b"")

    # random writes, an overwrite and a hole, fsynced, fd left open
    path = os.path.join(m.path, "patched")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    ref = bytearray(data(5, 10 * MiB))
    os.pwrite(fd, bytes(ref), 0)
    os.fsync(fd)
    rnd = random.Random(6)
    for _ in range(20):
        off, n = rnd.randrange(0, 12 * MiB), rnd.randrange(1, 300_000)
        chunk = data(rnd.randrange(1 << 30), n)
        os.pwrite(fd, chunk, off)
        if off > len(ref):
            ref.extend(bytes(off - len(ref)))
        ref[off:off + n] = chunk  # grows ref when the write ends past it
    os.fsync(fd)
    open_fds.append(fd)
    want["patched"] = bytes(ref)

    # truncated down after being fsynced, then fsynced again
    put("truncated", data(7, 7 * MiB))
    os.truncate(os.path.join(m.path, "truncated"), 3 * MiB + 5)
    want["truncated"] = want["truncated"][:3 * MiB + 5]
    return want, open_fds


def check_files(m, want: dict[str, bytes]) -> None:
    for rel, content in want.items():
        got = read_all(os.path.join(m.path, rel))
        assert len(got) == len(content), f"{rel}: {len(got)} bytes, expected {len(content)}"
        assert hashlib.sha256(got).digest() == hashlib.sha256(content).digest(), f"{rel}: content differs"


def read_every_file(m) -> int:
    """Read every regular file of the volume fully (EIO would raise); number of files."""
    n = 0
    for dirpath, _, files in os.walk(m.path):
        for name in files:
            read_all(os.path.join(dirpath, name))
            n += 1
    return n


def still_works(m) -> None:
    p = os.path.join(m.path, "after-crash")
    payload = data(99, 5 * MiB + 1)
    with open(p, "wb") as f:
        f.write(payload)
    assert read_all(p) == payload
    os.unlink(p)


@pytest.mark.parametrize("store", ["file", "s3"])
def test_fsynced_files_survive_kill(mounts, store):
    meta = mounts.format(store)
    m = mounts.mount(meta)
    want, fds = write_durable(m)
    # and something in flight that nobody promised to keep
    dirty = os.open(os.path.join(m.path, "dirty"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(dirty, data(8, 3 * MiB))
    fds.append(dirty)

    kill_daemon(m)
    for fd in fds:
        try:
            os.close(fd)  # FLUSH cannot reach a dead daemon
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.EIO), exc
    assert not volinspect.dangling_keys(meta)

    # `curvefs umount` clears a dead mount
    r = cli("umount", m.path)
    assert "dead mount" in r.stdout, r.stdout
    assert not is_mounted(m.path)
    os.stat(m.path)  # a plain directory again

    remount_cold(m)
    check_files(m, want)
    got = read_all(os.path.join(m.path, "dirty"))  # lost or kept, never EIO
    assert got in (b"", data(8, 3 * MiB)), len(got)
    read_every_file(m)
    still_works(m)


def test_mount_over_a_dead_mount(mounts):
    """`curvefs mount` (foreground and -d) on a mountpoint whose daemon was killed clears
    it and mounts; `curvefs umount` clears it.  A long attr timeout keeps the dead root's
    attributes in the kernel cache, so a plain stat of the mountpoint still succeeds."""
    meta = mounts.format("file")
    m = mounts.mount(meta, "--attr-timeout", "30")
    with open(os.path.join(m.path, "f"), "wb") as f:
        f.write(b"x" * 100_000)

    os.stat(m.path)
    kill_daemon(m)
    os.stat(m.path)  # answered from the attr cache, although the daemon is gone
    remount_cold(m)
    assert read_all(os.path.join(m.path, "f")) == b"x" * 100_000

    os.stat(m.path)
    kill_daemon(m)
    r = cli("mount", "-d", meta, m.path, "--cache-dir", m.cache_dir, "--log", m.log_file,
            "--attr-timeout", "30")
    assert "mounted on" in r.stdout
    pid = int(r.stdout.split("pid ")[1].rstrip(")\n"))
    assert read_all(os.path.join(m.path, "f")) == b"x" * 100_000

    os.stat(m.path)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)  # not our child: init reaps it
    os.stat(m.path)
    r = cli("umount", m.path)
    assert "dead mount" in r.stdout, r.stdout
    assert not is_mounted(m.path)


WRITER = r"""
import os, random, sys
path, total, sync_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
MiB = 1 << 20
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
for i in range(total):
    os.write(fd, random.Random(i).randbytes(MiB))
    print("wrote", (i + 1) * MiB, flush=True)
    if (i + 1) % sync_every == 0:
        os.fsync(fd)
        print("synced", (i + 1) * MiB, flush=True)
"""


@pytest.mark.parametrize("store", ["file", "s3"])
def test_kill_during_big_write(mounts, store):
    meta = mounts.format(store)
    m = mounts.mount(meta)
    base = data(11, 5 * MiB)
    with open(os.path.join(m.path, "base"), "wb") as f:
        f.write(base)
        os.fsync(f.fileno())
    big = os.path.join(m.path, "big")
    # 400 MiB in 1 MiB writes, fsynced every 32 MiB; killed when 32 MiB are durable and
    # 20 MiB more are in flight (buffered or being uploaded, not committed)
    w = subprocess.Popen([sys.executable, "-c", WRITER, big, "400", "32"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    synced = wrote = 0
    try:
        deadline = time.monotonic() + 120
        while not (synced >= 32 * MiB and wrote >= synced + 20 * MiB):
            assert time.monotonic() < deadline
            line = w.stdout.readline()
            assert line, f"writer ended early: {w.stderr.read()}"
            what, n = line.split()
            if what == "synced":
                synced = int(n)
            else:
                wrote = int(n)
        kill_daemon(m)
        w.wait(30)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    assert w.returncode != 0  # it saw ENOTCONN/EIO
    for line in w.stdout:
        what, n = line.split()
        if what == "synced":
            synced = max(synced, int(n))

    assert not volinspect.dangling_keys(meta), "metadata names objects that do not exist"
    leaked = volinspect.object_keys(meta) - volinspect.live_keys(meta) - volinspect.queued_keys(meta)
    # gc finds exactly the objects the crash leaked and deletes them; fsck finds no damage
    if store == "file":  # a put's temporary file the kill cut short: as if gc ran 10 min later
        bucket = volinspect.volume_format(meta)["bucket"]
        old = time.time() - 601
        for d, _, names in os.walk(bucket):
            for n in names:
                if n.startswith(".tmp-"):
                    os.utime(os.path.join(d, n), (old, old))
    r = json.loads(cli("gc", meta, "--min-age", "0", "--json").stdout)
    assert (r["leaked"], r["broken_files"]) == (len(leaked), 0), r
    cli("gc", meta, "--min-age", "0", "--delete")
    assert volinspect.object_keys(meta) == volinspect.live_keys(meta) | volinspect.queued_keys(meta)
    if store == "file":  # nor a put's temporary file, had the kill cut one short
        assert not [n for _, _, names in os.walk(bucket) for n in names if n.startswith(".tmp-")]
    assert cli("fsck", meta, check=False).returncode == 0
    assert cli("umount", m.path).returncode == 0
    remount_cold(m)

    assert read_all(os.path.join(m.path, "base")) == base
    got = read_all(big)
    assert len(got) >= synced
    for i in range(len(got) // MiB + (1 if len(got) % MiB else 0)):
        piece = got[i * MiB:(i + 1) * MiB]
        exp = random.Random(i).randbytes(MiB)[:len(piece)]
        if i * MiB < synced:
            assert piece == exp, f"fsynced MiB {i} differs"
        else:  # committed by buffer pressure, or a hole: never other bytes
            assert piece == exp or piece == bytes(len(piece)), f"MiB {i} is neither data nor zeros"
    assert read_every_file(m) == 2
    print(f"\n{store}: killed with {synced >> 20} MiB fsynced, {wrote >> 20} MiB written; {len(got) >> 20} MiB came back; "
          f"{len(leaked)} uploaded but uncommitted objects leaked (deleted by gc)")
    # the volume is usable: overwrite and delete the partial file, write a new one
    with open(big, "r+b") as f:
        f.write(b"fixed")
    os.unlink(big)
    still_works(m)
