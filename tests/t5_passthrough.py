"""FUSE passthrough through a real mount: file images in the disk cache, read by the kernel.

A read-only open of a file whose image is current is replied FOPEN_PASSTHROUGH:
its reads never reach the daemon (``fuse_op_read_count``) nor FUSE at all
(BPF ``kernel_fuse_requests_READ``), and the BPF page-cache counters still
count them for the mount inode.  Writes through the mount while such readers
are open, other clients' changes and crashes never make anyone read stale data.
"""
from __future__ import annotations

import glob
import json
import mmap
import os
import random
import subprocess
import time

import pytest

from mounthelper import read_cold
from t5_fastpath import delta, kdelta, make_file, poll, two_clients, wait_bpf

MiB = 1 << 20


def wait_passthrough(m, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(os.path.join(m.path, ".config")) as f:
            pt = json.load(f)["kernel_passthrough"]
        if pt["enabled"]:
            return
        if pt["reason"] and "FUSE_INIT not seen" not in pt["reason"] and pt["reason"] != "waiting for FUSE_INIT":
            pytest.skip(f"FUSE passthrough unavailable here: {pt['reason']}")
        time.sleep(0.1)
    raise AssertionError("passthrough did not come up")


def wait_image(m, builds: int = 1, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m.stats().get("image_builds", 0) >= builds:
            return
        time.sleep(0.05)
    raise AssertionError(f"no image built: {m.stats()}")


def read_until_image(m, path: str, builds: int = 1, tries: int = 3) -> None:
    """Read ``path`` through ``m`` until its image exists. A close-time build needs the
    slice lists the reads fetched; another client's change feed lags by tens of ms, and
    when its note of the write that made the file arrives after the read it drops them:
    then the next read's close builds instead (as for any reader)."""
    for _ in range(tries):
        with open(path, "rb") as fh:
            fh.read()
        try:
            wait_image(m, builds, timeout=5.0)
            return
        except AssertionError:
            continue
    raise AssertionError(f"no image built after {tries} reads: {m.stats()}")


def with_image(mounts, size: int, *options: str, seed: int = 1):
    """A file volume mounted with passthrough on (and ``options``), and a file of
    ``size`` bytes read once so that its image exists: (mount, path, data)."""
    m = mounts.mount(mounts.format("file"), *options)
    wait_passthrough(m)
    f = os.path.join(m.path, "f")
    data = make_file(f, size, seed=seed)
    assert read_cold(f) == data
    wait_image(m)
    return m, f, data


def random_reads(path: str, data: bytes, n: int, seed: int = 3) -> None:
    rnd = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(n):
            off = rnd.randrange(0, len(data) // 4096) * 4096
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
    finally:
        os.close(fd)


def resident_bytes(path: str) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.strip())


def held_images(m) -> dict[str, int]:
    """{image path: bytes of it mapped and resident} for the images the daemon maps."""
    held, path = {}, None
    with open(f"/proc/{m.proc.pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 6 and "/images/" in line:
                path = fields[5]
            elif "-" in fields[0]:
                path = None
            elif path and fields[0] == "Rss:":
                held[path] = held.get(path, 0) + int(fields[1]) * 1024
    return held


def drop_pages(path: str, length: int = 0) -> None:
    """posix_fadvise(DONTNEED) on the first ``length`` bytes of ``path`` (0: all of it),
    as reclaim would drop them: unmapped pages only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def image_of(m) -> list[str]:
    return sorted(glob.glob(os.path.join(m.cache_dir, "*", "images", "*")))


def image_for(m, path: str) -> str:
    """The image of the file at ``path`` (named ``<ino>-<version>-<length>``)."""
    (image,) = glob.glob(os.path.join(m.cache_dir, "*", "images", f"{os.stat(path).st_ino}-*"))
    return image


def test_entering_passthrough_pages_the_image_in(mounts):
    """The page cache of an idle image gets holes (reclaim; on this machine DAMON's
    proactive pageout takes pages idle for seconds), and a passthrough reader would
    pay a small synchronous disk read per hole. Entering passthrough mode asks the
    kernel to read the missing pages at once, before any read. (Without holds: a
    held image's pages are mapped, and DONTNEED leaves those.)"""
    m, f, data = with_image(mounts, 8 * MiB, "--image-hold", "0")
    (image,) = image_of(m)
    drop_pages(image)
    assert resident_bytes(image) < MiB
    before = m.stats()
    fd = os.open(f, os.O_RDONLY)
    try:
        poll(lambda: resident_bytes(image) == len(data))  # no read has happened
        after = m.stats()
        assert delta(before, after, "passthrough_opens") == 1
        assert delta(before, after, "passthrough_page_ins") == 1
        assert os.pread(fd, 4096, 5 * MiB) == data[5 * MiB:5 * MiB + 4096]
    finally:
        os.close(fd)


def test_recent_images_stay_mapped_so_idle_reclaim_leaves_them(mounts):
    """A held image is mapped in the daemon, so reclaim of unmapped page cache leaves
    it whole (DONTNEED drops exactly the unmapped pages; DAMON pageout schemes
    filtered to unmapped pages, as on this machine, do the same after seconds idle).
    Deleting the file ends its hold before the unlink: no mapping keeps its blocks."""
    m, f, data = with_image(mounts, 8 * MiB)
    (image,) = image_of(m)
    poll(lambda: held_images(m).get(image) == len(data))
    assert m.stats()["image_held_bytes"] == len(data)
    drop_pages(image)
    assert resident_bytes(image) == len(data)
    os.unlink(f)
    poll(lambda: not image_of(m))
    assert held_images(m) == {}
    with open(f"/proc/{m.proc.pid}/maps") as maps:
        assert not [ln for ln in maps if "/images/" in ln]  # not even an unlinked one
    poll(lambda: m.stats()["image_held_bytes"] == 0)


def test_image_holds_are_lru_within_the_limit(mounts):
    """--image-hold bounds the bytes held: a newer image ends the oldest hold, and an
    open takes the hold back (for the image the kernel reads from now); 0 holds nothing."""
    m, a, data_a = with_image(mounts, 8 * MiB, "--image-hold", "12M")
    b = os.path.join(m.path, "b")
    make_file(b, 8 * MiB, seed=2)
    read_until_image(m, b, builds=2)
    img_a, img_b = (image_for(m, p) for p in (a, b))
    poll(lambda: set(held_images(m)) == {img_b})
    with open(a, "rb") as fh:  # passthrough: reads never reach the daemon
        poll(lambda: set(held_images(m)) == {img_a})
        assert fh.read() == data_a
    assert m.stats()["image_held_bytes"] == 8 * MiB
    m2, f2, data2 = with_image(mounts, 8 * MiB, "--image-hold", "0")
    assert open(f2, "rb").read() == data2  # a passthrough open
    assert held_images(m2) == {}  # a build is counted after its hold
    assert m2.stats()["image_held_files"] == 0


def test_holds_survive_a_remount_as_far_as_resident(mounts):
    """A new daemon holds again the images still in the page cache, as far as they are
    (without reading the disk for them), so a remount does not leave them to idle
    reclaim; the next open of a partly held image maps the rest, and an image the page
    cache lost entirely is held, whole, at its next open."""
    m, a, data_a = with_image(mounts, 8 * MiB)
    b = os.path.join(m.path, "b")
    data_b = make_file(b, 4 * MiB, seed=2)
    read_until_image(m, b, builds=2)
    img_a, img_b = image_for(m, a), image_for(m, b)
    poll(lambda: held_images(m) == {img_a: 8 * MiB, img_b: 4 * MiB})
    m.stop()
    drop_pages(img_a, 2 * MiB)  # unmapped now: dropped
    drop_pages(img_b)
    assert resident_bytes(img_a) <= 6 * MiB and resident_bytes(img_b) == 0
    m.start()
    wait_passthrough(m)
    # img_a as far as it is still resident (idle reclaim may take more meanwhile)
    poll(lambda: set(held_images(m)) == {img_a} and held_images(m)[img_a] == resident_bytes(img_a) > 0)
    assert resident_bytes(img_b) == 0  # not read for the hold
    assert held_images(m)[img_a] <= 6 * MiB
    with open(a, "rb") as fh:
        poll(lambda: held_images(m).get(img_a) == 8 * MiB)
        assert fh.read() == data_a
    with open(b, "rb") as fh:
        poll(lambda: held_images(m).get(img_b) == 4 * MiB and img_a in held_images(m))
        assert fh.read() == data_b


def test_second_open_is_read_by_the_kernel(mounts):
    meta = mounts.format("s3")
    m = mounts.mount(meta)
    wait_bpf(m)
    wait_passthrough(m)
    f = os.path.join(m.path, "f")
    data = bytearray(make_file(f, 12 * MiB))
    # a hole in the middle: the image keeps it as a hole, reads give zeros
    with open(f, "r+b") as fh:
        fh.truncate(20 * MiB)
        fh.seek(16 * MiB)
        fh.write(b"tail" * 1024)
    data += bytes(8 * MiB)
    data[16 * MiB:16 * MiB + 4096] = b"tail" * 1024
    data = bytes(data)
    assert read_cold(f) == data  # first open: cached mode; starts the image
    wait_image(m)
    before = m.stats()
    random_reads(f, data, 2000)
    after = m.stats()
    assert delta(before, after, "passthrough_opens") == 1
    assert delta(before, after, "fuse_op_read_count") == 0
    assert kdelta(before, after, "READ") == 0
    # the BPF page-cache counters see the reads on the image as reads of this inode
    assert delta(before, after, "kernel_read_calls") >= 2000
    assert delta(before, after, "chunk_object_get_count") == 0
    img = [n for n in os.listdir(os.path.join(m.cache_dir, os.listdir(m.cache_dir)[0], "images"))
           if not n.startswith(".")]
    assert len(img) == 1
    st = os.stat(os.path.join(m.cache_dir, os.listdir(m.cache_dir)[0], "images", img[0]))
    assert st.st_size == len(data) and st.st_blocks * 512 < 16 * MiB  # sparse


def test_image_survives_remount_and_needs_no_object_store(mounts):
    meta = mounts.format("s3")
    m = mounts.mount(meta)
    wait_passthrough(m)
    f = os.path.join(m.path, "f")
    data = make_file(f, 8 * MiB)
    assert read_cold(f) == data
    wait_image(m)
    m.stop()
    m.start()
    wait_passthrough(m)
    before = m.stats()
    random_reads(f, data, 500)
    with open(f, "rb") as fh:
        assert fh.read() == data
    after = m.stats()
    assert delta(before, after, "passthrough_opens") == 2
    assert delta(before, after, "fuse_op_read_count") == 0
    assert delta(before, after, "chunk_object_get_count") == 0


def test_writes_while_passthrough_readers_are_open(mounts):
    m, f, data = with_image(mounts, 4 * MiB)
    model = bytearray(data)
    before = m.stats()
    r = os.open(f, os.O_RDONLY)
    w = os.open(f, os.O_RDWR)
    try:
        os.pwrite(w, b"A" * 5000, 100_000)
        model[100_000:105_000] = b"A" * 5000
        assert os.pread(r, 5000, 100_000) == b"A" * 5000  # seen at once, like a local file
        os.pwrite(w, b"B" * 3000, 4 * MiB + 10)  # extends the file
        model += bytes(10) + b"B" * 3000
        assert os.fstat(r).st_size == len(model)
        assert os.pread(r, 3000, 4 * MiB + 10) == b"B" * 3000
        os.ftruncate(w, 3 * MiB)
        del model[3 * MiB:]
        assert os.fstat(r).st_size == 3 * MiB
        assert os.pread(r, 4096, 3 * MiB - 100) == bytes(model[-100:])
        with open(f, "rb") as mf:  # a reader opened now reads through the daemon; its mmap, the image
            assert mf.read() == bytes(model)
            mm = mmap.mmap(mf.fileno(), 0, prot=mmap.PROT_READ)
            assert mm[:] == bytes(model)
            mm.close()
        os.fsync(w)
    finally:
        os.close(w)
        os.close(r)
    after = m.stats()
    assert delta(before, after, "passthrough_opens") == 1
    assert delta(before, after, "passthrough_direct_opens") == 2  # the writer, the late reader
    assert delta(before, after, "passthrough_mirrored_bytes") == 8000
    # after the mode ended: the changed image was dropped, nothing stale is served
    assert read_cold(f) == bytes(model)
    with open(f, "rb") as fh:
        assert fh.read() == bytes(model)
    m.stop()
    m.start()
    with open(f, "rb") as fh:
        assert fh.read() == bytes(model)


def test_other_client_change_is_never_read_stale(mounts):
    a, b, fa, fb = two_clients(mounts)
    wait_passthrough(b)
    make_file(fa, 3 * MiB, seed=1)
    read_until_image(b, fb)
    old_reader = os.open(fb, os.O_RDONLY)  # B in passthrough mode on version 1
    try:
        new = make_file(fa, 3 * MiB, seed=2)  # same size: only the data version tells
        before = b.stats()
        with open(fb, "rb") as fh:  # must be passthrough (mode) but read through the daemon
            assert fh.read() == new
            # and its mmap, which the kernel serves from the mode's image: the open
            # rewrote the image with the new version (it showed the old bytes)
            with mmap.mmap(fh.fileno(), 3 * MiB, prot=mmap.PROT_READ) as mm:
                assert mm[:] == new
        after = b.stats()
        assert delta(before, after, "passthrough_direct_opens") == 1
        assert delta(before, after, "passthrough_refreshes") == 1
    finally:
        os.close(old_reader)
    with open(fb, "rb") as fh:  # mode ended: the version-1 image is not current any more
        assert fh.read() == new
    newer = make_file(fa, 2 * MiB, seed=3)
    with open(fb, "rb") as fh:
        assert fh.read() == newer
    assert os.stat(fb).st_size == 2 * MiB


def test_building_never_fetches_from_object_store(mounts):
    meta = mounts.format("s3")
    a = mounts.mount(meta)
    f = os.path.join(a.path, "big")
    data = make_file(f, 16 * MiB)
    b = mounts.mount(meta)  # empty cache
    wait_passthrough(b)
    before = b.stats()
    with open(os.path.join(b.path, "big"), "rb") as fh:
        assert fh.read(4096) == data[:4096]
    time.sleep(1)
    after = b.stats()
    assert delta(before, after, "image_builds") == 0
    assert delta(before, after, "image_builds_not_local") == 1
    assert delta(before, after, "chunk_object_get_count") <= 2  # the block read (+ readahead)


def test_no_passthrough_option(mounts):
    meta = mounts.format("file")
    m = mounts.mount(meta, "--no-passthrough")
    with open(os.path.join(m.path, ".config")) as fh:
        pt = json.load(fh)["kernel_passthrough"]
    assert pt == {"enabled": False, "reason": "disabled (--passthrough-max 0)"}
    f = os.path.join(m.path, "f")
    data = make_file(f, 2 * MiB)
    assert read_cold(f) == data
    before = m.stats()
    assert read_cold(f) == data
    after = m.stats()
    assert delta(before, after, "fuse_op_read_count") > 0
    assert delta(before, after, "passthrough_opens") == 0


def test_kill9_while_image_is_being_changed(mounts):
    m, f, _ = with_image(mounts, 2 * MiB)
    r = os.open(f, os.O_RDONLY)
    w = os.open(f, os.O_RDWR)
    os.pwrite(w, b"durable!" * 512, 0)
    os.fsync(w)
    os.pwrite(w, b"maybe" * 100, 8192)  # not fsynced: may or may not survive
    m.kill()
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass
    m.start()
    with open(f, "rb") as fh:
        got = fh.read(8192)
    assert got[:4096] == b"durable!" * 512
